"""Numerical parity of camu_jax with the PyTorch port of the reference.

From identical weights (`experiments.pytorch_reference.convert`) and identical batches, the JAX
steps (`camu_step`, `train_step`) and the PyTorch port (`experiments.pytorch_reference`) must
give the same losses, parameters and BatchNorm running statistics. The JAX side pads a short
last batch to the full size with mask zeros; PyTorch gets the short batch, as its `DataLoader`
serves it. The teacher embeddings z0_s, z0_cf come from the JAX frozen model in eval mode and
are passed in the batch (as `camu_step` expects); PyTorch recomputes them every step, as the
reference does.

Every tolerance follows from the unit roundoff u (2^-24 in float32, 2^-53 in float64), the
shapes of the computation and Adam's constants; none is fitted to a run, and no element may
fall outside its tolerance.

Steps are compared in float64 on both sides (JAX with x64, PyTorch `.double()`), free-running:
the CNN's CaMU steps 1, 10 and 11 (11 short), a short first step, its original training steps
1, 10 and 11 (11 short), ResNet18 with the CIFAR stem (16x16, batch 8) steps 1-3 (3 short) and
with the ImageNet stem (64x64, batch 4) steps 1-2 (2 short). Updated parameters are not
compared in float32, because two float32 runs differ there by discrete events:

* Adam's first step is sign-like, lr * g / (|g| + eps): where the float32 rounding of g (~1e-7
  of the gradient's scale) exceeds eps = 1e-8, one side can step by +lr and the other by -lr.
* A ReLU unit whose pre-activation lies within float32 rounding of 0, or a max-pool window
  with two entries that close (about one per CaMU step of the CNN at batch 32, which makes four
  forward passes), routes its gradient differently on the two sides: a whole term of a gradient
  sum is on one side only.

Neither is bounded by rounding, and their number varies between machines (a float32 comparison
that let 89 of the CNN's 449 098 elements fail saw 158 on another machine). In float64 the
gradient's rounding (~1e-16 of its scale) stays far below eps, where Adam's step is smooth, and
a unit within float64 rounding of a kink is a ~1e-7 event per run.

Float64 tolerances (`_f64_problems`). rho = 2 depth u sqrt(N) is the relative rounding of a
gradient: a forward and a backward pass through `depth` layers, each a sum of at most N terms
with the statistical rounding error u sqrt(n) of its scale (Higham, Accuracy and Stability of
Numerical Algorithms, 2nd ed., section 2.8); `Config.depth`, `Config.reduction`.

* Parameters after t steps, each element: |jax - torch| <= atol + 8 k u |theta|, with
  atol = t * sum over the optimizers of lr * ADAM_SLOPE * rho * G. A gradient error dg moves
  Adam's update by at most lr * ADAM_SLOPE * dg, ADAM_SLOPE = (1 + R) / eps, R the largest
  |m_hat| / sqrt(v_hat) (Cauchy-Schwarz over the moment sums: 7.27 for b1 0.9, b2 0.999); this
  slope is reached only where |g| ~ eps and dominates everything else. G, the leaf's largest
  gradient, is bounded by the run's own second moment: |g_s| <= sqrt(v_t / ((1 - b2) b2^(t-1)))
  for every step s <= t. k is the number of optimizer updates, a few roundings of theta each.
* Losses and running statistics, smooth functions of the parameters (no Adam division):
  |jax - torch| <= (t rho + 2 depth r) * scale, where r is the largest relative parameter
  difference of the two runs so far (max |d theta| / rms theta over leaves and steps): to first
  order a relative weight perturbation r moves each layer's output by r, and a loss or a
  variance by at most twice the sum over layers. scale: a statistic's largest value; for L_rep
  n log(D) + |L| (the KL sums' terms p log p and p log q are of size log D each, n examples);
  for a cross-entropy log(C) + |L|.

Float32 comparisons are kept where rounding bounds them, with the forward error
rho_f = depth u sqrt(fan_in) of an output's scale (one pass; `_rel_rounding`):

* forward passes (`test_convert_forward_matches`): |jax - torch| <= 2 rho_f max |y| per output
  (two sides). ReLU and max-pool are 1-Lipschitz, so their kinks pass rounding on unamplified.
* the first step's losses, from identical parameters (`test_first_step_losses_float32`):
  L_rep and the training cross-entropy. The forward bound on each embedding or logit reaches
  the loss through the loss's gradient with respect to them, evaluated at the computed point
  (first order), plus the rounding of the loss's own sums (`_kl_sum_error`,
  `_cross_entropy_error`). CNN only: in train mode BatchNorm divides by a batch standard
  deviation, which this forward error model does not bound.

No tolerance depends on a machine: they use u, the shapes, Adam's constants and the run's own
magnitudes, and a different summation order (other BLAS kernels, vector widths, threads)
changes which rounding errors occur, not their scale. On the development machine the largest
|diff| / tolerance is 1e-3 for float64 parameters, 2e-4 for running statistics and 4e-6 for
losses; 4e-2 in the float32 forward passes and 2e-3 in the float32 losses. JAX runs under
`jax.default_matmul_precision("highest")`, so float32 means float32 arithmetic on GPUs and TPUs
too (no TF32 / bfloat16 passes). The negative test checks that a changed loss coefficient fails
the float64 comparison (by a factor of 2e6 in the parameters).

Learning rates: the reference's MNIST class preset (KL_LR 4e-4, IMPAIR_LR 1e-3) for the CNN and
its CIFAR class preset (1e-5, 5e-5) for ResNet18, the models the reference uses them with.

Step A's optimizer: PyTorch's Adam skips parameters whose `.grad` is None, and the classifier
head never gets a gradient from L_rep, so optimizer 1 never touches the head (no Adam update, no
weight decay). `camu_step` must do the same with the plain `adam_l2` that `camu_jax.methods.camu`
passes it; `test_step_a_leaves_the_head_alone` checks that directly, and the CNN comparisons
would fail otherwise (the head is ~7 % of its elements).
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import traverse_util  # noqa: E402

from camu_jax import models, steps  # noqa: E402
from camu_jax.methods import camu  # noqa: E402
from camu_jax.models import create_model  # noqa: E402
from experiments.pytorch_reference import camu as torch_camu  # noqa: E402
from experiments.pytorch_reference import convert  # noqa: E402
from experiments.pytorch_reference import models as torch_models  # noqa: E402
from experiments.pytorch_reference import train as torch_train  # noqa: E402

pytestmark = pytest.mark.torch

NUM_CLASSES = 10
TRAIN_LR = 1e-3
HEADS = {"cnn": ("fc2", "fc3"), "resnet18_cifar": ("fc",), "resnet18": ("fc",)}
UNIT_ROUNDOFF = {np.float32: 2.0**-24, np.float64: 2.0**-53}
U32, U64 = UNIT_ROUNDOFF[np.float32], UNIT_ROUNDOFF[np.float64]
TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}
# Adam as both sides configure it (PyTorch's defaults; `steps.adam_l2`).
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
# sup over steps of |m_hat| / sqrt(v_hat): Cauchy-Schwarz on the two exponential sums (bias
# corrections included; the bound is the limit t -> inf, 1 at t = 1).
ADAM_RATIO = (1 - ADAM_B1) / math.sqrt((1 - ADAM_B2) * (1 - ADAM_B1**2 / ADAM_B2))
# |d(update) / d(g)| <= lr * ADAM_SLOPE for update = lr m_hat / (sqrt(v_hat) + eps): through
# m_hat at most 1 / eps, through v_hat at most ADAM_RATIO / eps (d sqrt(v_hat) / dg <= 1).
ADAM_SLOPE = (1 + ADAM_RATIO) / ADAM_EPS


class Config:
    """A compared run. `depth`: linear layers on the longest path (CNN: 2 conv + 3 dense;
    ResNet18: 17 conv + 1 dense); `fan_in`: the longest sum of a forward pass (CNN: fc1's 1568;
    ResNet18: a 3x3x512 convolution's 4608)."""

    def __init__(self, model, shape, batch, sizes, kl_lr, impair_lr, depth, fan_in, embedding):
        self.model, self.shape, self.batch, self.sizes = model, shape, batch, tuple(sizes)
        self.kl_lr, self.impair_lr = kl_lr, impair_lr
        self.depth, self.fan_in, self.embedding = depth, fan_in, embedding

    @property
    def reduction(self) -> int:
        """The longest sum of a forward or backward pass: a fan-in, or the first layer's weight
        gradient summed over the batch and every pixel (at most the input's)."""
        return max(self.fan_in, self.batch * self.shape[0] * self.shape[1])


CONFIGS = {
    # 10 full batches, then a short last one (20 of 32).
    "cnn": Config("cnn", (28, 28, 1), 32, [32] * 10 + [20], 4e-4, 1e-3, 5, 1568, 256),
    # ResNet18 in float64 is slow on a CPU: small images, few steps, each stage still has
    # spatial extent (CIFAR stem: 16 -> 2x2 at layer4; ImageNet stem: 64 -> 2x2).
    "resnet18_cifar": Config(
        "resnet18_cifar", (16, 16, 3), 8, [8, 8, 5], 1e-5, 5e-5, 18, 4608, 512
    ),
    "resnet18_imagenet": Config("resnet18", (64, 64, 3), 4, [4, 3], 1e-5, 5e-5, 18, 4608, 512),
}


def _rel_rounding(unit: float, depth: int, n: int, passes: int = 1) -> float:
    """Relative rounding error of an output of `passes` passes through `depth` layers of sums
    of at most `n` terms (see the module docstring)."""
    return passes * depth * unit * math.sqrt(n)


@contextlib.contextmanager
def _precision(dtype):
    """JAX in `dtype` (x64 for float64) with full-precision matmuls."""
    with jax.enable_x64(dtype == np.float64), jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module", autouse=True)
def _deterministic_torch():
    # One thread: identical results, and no collapse of PyTorch's OpenMP barriers when other
    # processes share the cores (2 threads on a busy 2-core machine run ~10x slower).
    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.set_num_threads(previous[1])


# ----------------------------------------------------------------------------- data, weights


def _original_variables(name: str, shape, dtype=np.float32, seed: int = 0) -> dict:
    """Random variables of the model's shapes (from `jax.eval_shape`, so no slow eager init),
    drawn like the models' own initialisers (PyTorch's: uniform +-1/sqrt(fan_in) for layers
    with a bias, kaiming-normal fan-out for ResNet convolutions), plus non-trivial BatchNorm
    parameters and running statistics, so the frozen model's eval mode and the new model's
    train mode really differ. The same values in either dtype (drawn in float32); call float64
    inside `_precision(np.float64)`."""
    model = create_model(name, num_classes=NUM_CLASSES)
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(seed), shape))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        kind, size = path[-1], leaf.shape
        if kind == "kernel" and len(size) == 4 and name != "cnn":
            fan_out = int(np.prod(size[:2])) * size[3]
            value = rng.normal(0.0, np.sqrt(2.0 / fan_out), size)
        elif kind == "kernel":
            bound = 1.0 / np.sqrt(np.prod(size[:-1]))
            value = rng.uniform(-bound, bound, size)
        elif kind == "mean":
            value = rng.normal(0.0, 0.2, size)
        elif kind == "var":
            value = rng.uniform(0.5, 1.5, size)
        elif kind == "scale":
            value = rng.uniform(0.8, 1.2, size)
        else:  # biases
            value = rng.uniform(-0.05, 0.05, size)
        return jnp.asarray(value.astype(np.float32), dtype)

    out = {}
    for collection, tree in shapes.items():
        flat = traverse_util.flatten_dict(tree) if tree else {}
        flat = {p: draw(p, v) for p, v in flat.items()}
        out[collection] = traverse_util.unflatten_dict(flat) if flat else {}
    _assert_dtype(out, dtype)
    return out


def _camu_batches(seed: int, sizes, shape) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        x_s = rng.random((n, *shape), dtype=np.float32)
        y_f = rng.integers(0, NUM_CLASSES, n)
        y_s = rng.integers(0, NUM_CLASSES, n)
        redraw = (y_f + rng.integers(1, NUM_CLASSES, n)) % NUM_CLASSES
        out.append(
            {
                "x_f": rng.random((n, *shape), dtype=np.float32),
                "y_f": y_f,
                "x_cf": x_s + rng.random((n, *shape), dtype=np.float32),
                "y_cf": np.where(y_s == y_f, redraw, y_s),
                "x_s": x_s,
                "y_s": y_s,
            }
        )
    return out


def _train_batches(seed: int, sizes, shape) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.random((n, *shape), dtype=np.float32),
            "label": rng.integers(0, NUM_CLASSES, n),
        }
        for n in sizes
    ]


def _cast(batch: dict, dtype) -> dict:
    """Float inputs in `dtype` (the same values: they are drawn in float32), labels as they are."""
    return {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in batch.items()}


def _assert_dtype(tree, dtype) -> None:
    """Every floating leaf of `tree` is `dtype`: a float64 run that silently fell back to
    float32 (x64 off, a float32 template) would compare float32 rounding to a float64 bound."""
    found = {np.asarray(x).dtype for x in jax.tree.leaves(tree) if np.asarray(x).dtype.kind == "f"}
    assert found <= {np.dtype(dtype)}, f"expected {np.dtype(dtype)} leaves, found {found}"


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    pad = np.zeros((size - array.shape[0], *array.shape[1:]), array.dtype)
    return np.concatenate([array, pad])


def _mask(n: int, size: int) -> np.ndarray:
    return (np.arange(size) < n).astype(np.float32)


def _nchw(x: np.ndarray):
    # A fresh C-order copy: canonical NCHW strides, as a DataLoader batch has.
    return torch.from_numpy(np.array(x.transpose(0, 3, 1, 2), order="C", copy=True))


def _host(tree):
    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


# ----------------------------------------------------------------------------- JAX side


@functools.cache
def _jitted_camu(config: str, coefficients: camu.CamuCoefficients):
    """Step A's optimizer exactly as `camu_jax.methods.camu` builds it: plain `adam_l2` (the head,
    which PyTorch's optimizer 1 skips, is `camu_step`'s business; see the head test)."""
    c = CONFIGS[config]
    model = create_model(c.model, num_classes=NUM_CLASSES)
    kl_tx, ce_tx = steps.adam_l2(c.kl_lr), steps.adam_l2(c.impair_lr)
    step = functools.partial(
        camu.camu_step, model=model, kl_tx=kl_tx, ce_tx=ce_tx, coefficients=coefficients
    )
    return jax.jit(step), kl_tx, ce_tx


@functools.cache
def _jitted_embed(name: str):
    """Eval-mode `(logits, embedding)` of the frozen model."""
    model = create_model(name, num_classes=NUM_CLASSES)

    @jax.jit
    def embed(variables, x):
        logits, z, _ = models.apply_model(
            model, variables["params"], variables["batch_stats"], x, train=False
        )
        return logits, z

    return embed


@functools.cache
def _jax_camu(config: str, seed: int, sizes: tuple, dtype, coefficients=None) -> list[dict]:
    """Free-running JAX CaMU steps on `_camu_batches(seed, sizes)` in `dtype` with the loss
    `coefficients` (None: the reference's); per step the losses, the variables and the full
    state (host copies)."""
    c = CONFIGS[config]
    with _precision(dtype):
        original = _original_variables(c.model, c.shape, dtype)
        step, kl_tx, ce_tx = _jitted_camu(config, coefficients or camu.CamuCoefficients())
        embed = _jitted_embed(c.model)
        state = camu.init_camu_state(original, kl_tx, ce_tx)
        out = []
        for b in _camu_batches(seed, sizes, c.shape):
            n = b["y_s"].shape[0]
            p = {k: _pad(v, c.batch) for k, v in _cast(b, dtype).items()}
            batch = {
                "x_f": p["x_f"],
                "x_s": p["x_s"],
                "y_s": p["y_s"].astype(np.int32),
                "y_cf": p["y_cf"].astype(np.int32),
                "z0_s": embed(original, p["x_s"])[1],
                "z0_cf": embed(original, p["x_cf"])[1],
                "mask_f": _mask(n, c.batch),
                "mask_s": _mask(n, c.batch),
            }
            state, metrics = step(state, batch)
            assert bool(metrics["finite"])
            host = _host(state)
            _assert_dtype(host, dtype)
            out.append(
                {
                    "loss_rep": float(metrics["loss_rep"]),
                    "loss_out": float(metrics["loss_out"]),
                    "variables": {"params": host.params, "batch_stats": host.batch_stats},
                    "state": host,
                }
            )
    return out


@functools.cache
def _jitted_train(name: str):
    model = create_model(name, num_classes=NUM_CLASSES)
    tx = steps.adam_l2(TRAIN_LR)
    return jax.jit(functools.partial(steps.train_step, model=model, tx=tx)), tx


@functools.cache
def _jax_train(sizes: tuple, dtype) -> list[dict]:
    """Free-running original training of the CNN (original seed 3, batches seed 2)."""
    c = CONFIGS["cnn"]
    with _precision(dtype):
        original = _original_variables(c.model, c.shape, dtype, seed=3)
        step, tx = _jitted_train(c.model)
        state = steps.init_train_state(original, tx)
        out = []
        for b in _train_batches(2, sizes, c.shape):
            n = b["label"].shape[0]
            batch = {
                "image": _pad(b["image"].astype(dtype), c.batch),
                "label": _pad(b["label"], c.batch).astype(np.int32),
                "mask": _mask(n, c.batch),
            }
            state, metrics = step(state, batch)
            host = _host(state)
            _assert_dtype(host, dtype)
            out.append(
                {
                    "loss": float(metrics["loss"]),
                    "variables": {"params": host.params, "batch_stats": host.batch_stats},
                    "state": host,
                }
            )
    return out


# ----------------------------------------------------------------------------- PyTorch side


def _torch_model(name: str, variables: dict, dtype=np.float32):
    module = torch_models.create_model(name, num_classes=NUM_CLASSES)
    module.to(TORCH_DTYPES[dtype])
    convert.flax_to_torch(variables, module)
    return module


def _torch_variables(module, template, dtype) -> dict:
    # `torch_to_flax` casts to the template's dtype: check the module's own tensors first.
    found = {v.dtype for v in module.state_dict().values() if v.is_floating_point()}
    assert found == {TORCH_DTYPES[dtype]}, f"PyTorch module in {found}, expected {dtype}"
    with _precision(dtype):
        out = _host(convert.torch_to_flax(module, template))
    _assert_dtype(out, dtype)
    return out


@functools.cache
def _torch_camu(config: str, seed: int, sizes: tuple, dtype) -> list[dict]:
    """Free-running PyTorch port steps, the reference's loop body, on the batches of
    `_jax_camu`, with the models and inputs in `dtype`."""
    c = CONFIGS[config]
    with _precision(dtype):
        original = _original_variables(c.model, c.shape, dtype)
    teacher = _torch_model(c.model, original, dtype)
    new = _torch_model(c.model, original, dtype)
    teacher.eval()
    new.train()
    opt1, opt2 = torch_camu.make_optimizers(new, kl_lr=c.kl_lr, impair_lr=c.impair_lr)
    out = []
    for b in _camu_batches(seed, sizes, c.shape):
        b = _cast(b, dtype)
        loss2, loss4 = torch_camu.camu_step(
            teacher,
            new,
            opt1,
            opt2,
            _nchw(b["x_f"]),
            _nchw(b["x_cf"]),
            torch.from_numpy(b["y_cf"]).long(),
            _nchw(b["x_s"]),
            torch.from_numpy(b["y_s"]).long(),
            torch_camu.Coefficients(),
        )
        out.append(
            {
                "loss_rep": loss2.item(),
                "loss_out": loss4.item(),
                "variables": _torch_variables(new, original, dtype),
            }
        )
    return out


@functools.cache
def _torch_train(sizes: tuple, dtype) -> list[dict]:
    c = CONFIGS["cnn"]
    with _precision(dtype):
        original = _original_variables(c.model, c.shape, dtype, seed=3)
    model = _torch_model(c.model, original, dtype)
    model.train()
    optimizer = torch_train.make_optimizer(model, lr=TRAIN_LR, weight_decay=1e-4)
    out = []
    for b in _train_batches(2, sizes, c.shape):
        x = _nchw(b["image"].astype(dtype))
        loss = torch_train.train_step(model, optimizer, x, torch.from_numpy(b["label"]).long())
        out.append({"loss": loss.item(), "variables": _torch_variables(model, original, dtype)})
    return out


# ----------------------------------------------------------------------------- float64 check


def _adam_nu(opt_state) -> dict:
    """The second moment of the one `scale_by_adam` in an optax state, flattened."""
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(found) == 1, f"expected one Adam state, found {len(found)}"
    return traverse_util.flatten_dict(found[0].nu)


def _flat(variables: dict, collection: str) -> dict:
    tree = variables[collection]
    return traverse_util.flatten_dict(tree) if tree else {}


def _f64_problems(
    c: Config, j: list[dict], t: list[dict], step: int, lrs: dict, loss_scales: dict
) -> list[str]:
    """What fails the float64 comparison of two free-running trajectories after `step` steps
    (1-based); tolerances as derived in the module docstring. `lrs`: optimizer state name in
    the JAX state -> learning rate; `loss_scales`: loss name -> scale as a function of the
    loss's value."""
    rho = _rel_rounding(U64, c.depth, c.reduction, passes=2)
    problems = []

    jp, tp = _flat(j[step - 1]["variables"], "params"), _flat(t[step - 1]["variables"], "params")
    assert jp.keys() == tp.keys()
    nus = {name: _adam_nu(getattr(j[step - 1]["state"], name)) for name in lrs}
    updates = step * len(lrs)
    for path in sorted(tp):
        # Every gradient so far, bounded by the second moment it left behind.
        largest_g = {
            name: math.sqrt(float(np.max(nu[path])) / ((1 - ADAM_B2) * ADAM_B2 ** (step - 1)))
            for name, nu in nus.items()
        }
        # Per step and optimizer: Adam's steepest slope times the gradient's rounding.
        atol = step * ADAM_SLOPE * rho * sum(lr * largest_g[name] for name, lr in lrs.items())
        # Plus the update arithmetic on theta itself (decay, subtraction: a few roundings each).
        tol = atol + 8 * updates * U64 * np.abs(tp[path])
        diff = np.abs(jp[path] - tp[path])
        if np.any(diff > tol):
            problems.append(
                f"params/{'/'.join(path)}: {int(np.sum(diff > tol))} of {diff.size} elements "
                f"over tolerance, max |diff| {diff.max():.3g} (atol {atol:.3g})"
            )

    # The largest relative parameter difference of the two runs up to this step: the losses
    # and statistics of step `step` come from parameters of this step and the one before, the
    # running statistics from every step before.
    r = 0.0
    for s in range(step):
        a, b = _flat(j[s]["variables"], "params"), _flat(t[s]["variables"], "params")
        for path in b:
            rms = float(np.sqrt(np.mean(np.square(b[path]))))
            r = max(r, float(np.max(np.abs(a[path] - b[path]))) / max(rms, np.finfo(float).tiny))
    smooth = step * rho + 2 * c.depth * r

    for name, scale in loss_scales.items():
        jv, tv = j[step - 1][name], t[step - 1][name]
        tol = smooth * scale(tv)
        if not abs(jv - tv) <= tol:
            problems.append(
                f"{name}: JAX {jv!r}, PyTorch {tv!r}, |diff| {abs(jv - tv):.3g} > {tol:.3g}"
            )

    js = _flat(j[step - 1]["variables"], "batch_stats")
    ts = _flat(t[step - 1]["variables"], "batch_stats")
    assert js.keys() == ts.keys()
    for path in sorted(ts):
        tol = smooth * float(np.max(np.abs(ts[path])))
        diff = float(np.max(np.abs(js[path] - ts[path])))
        if diff > tol:
            problems.append(f"batch_stats/{'/'.join(path)}: max |diff| {diff:.3g} > {tol:.3g}")
    return problems


def _camu_loss_scales(c: Config, n: int) -> dict:
    return {
        "loss_rep": lambda v: n * math.log(c.embedding) + abs(v),
        "loss_out": lambda v: math.log(NUM_CLASSES) + abs(v),
    }


def _assert_camu_f64(config: str, seed: int, sizes: tuple, step: int) -> None:
    c = CONFIGS[config]
    j = _jax_camu(config, seed, sizes, np.float64)
    t = _torch_camu(config, seed, sizes, np.float64)
    lrs = {"kl_opt_state": c.kl_lr, "ce_opt_state": c.impair_lr}
    problems = _f64_problems(c, j, t, step, lrs, _camu_loss_scales(c, sizes[step - 1]))
    assert not problems, f"{config}, step {step} of {sizes}, float64: " + "; ".join(problems)


# ----------------------------------------------------------------------------- conversion


def test_convert_round_trip_cnn():
    original = _host(_original_variables("cnn", (28, 28, 1)))
    module = torch_models.CNN()
    convert.flax_to_torch(original, module)
    back = _host(convert.torch_to_flax(module, original))
    assert back["batch_stats"] == {}
    jax.tree.map(np.testing.assert_array_equal, original["params"], back["params"])
    np.testing.assert_array_equal(
        module.fc1.weight.detach().numpy(), original["params"]["fc1"]["kernel"].T
    )


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_convert_round_trip_resnet(stem):
    name = "resnet18_cifar" if stem == "cifar" else "resnet18"
    original = _host(_original_variables(name, (32, 32, 3)))
    for module in (
        torch_models.ReferenceResNet(NUM_CLASSES, stem=stem),  # the reference's layout
        torch_models.resnet18(NUM_CLASSES, stem=stem),  # torchvision's layout
    ):
        convert.flax_to_torch(original, module)
        for source in (module, module.state_dict()):
            back = _host(convert.torch_to_flax(source, original))
            jax.tree.map(np.testing.assert_array_equal, original, back)


@pytest.mark.parametrize("config", ["cnn", "resnet18_cifar"])
def test_convert_forward_matches(config):
    """Eval-mode forward pass in float32: logits and embeddings within 2 rho_f of their scale
    (two sides; see the module docstring)."""
    c = CONFIGS[config]
    x = np.random.default_rng(0).random((2, *c.shape), dtype=np.float32)
    with _precision(np.float32):
        variables = _original_variables(c.model, c.shape)
        logits, emb = _jitted_embed(c.model)(variables, x)
    module = _torch_model(c.model, _host(variables))
    module.eval()
    with torch.no_grad():
        t_logits, t_emb = module(_nchw(x))
    rho_f = _rel_rounding(U32, c.depth, c.fan_in)
    for what, a, b in (("logits", logits, t_logits), ("embedding", emb, t_emb)):
        b = b.numpy()
        tol = 2 * rho_f * float(np.max(np.abs(b)))
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=tol, err_msg=f"{config} {what}")


def test_convert_rejects_mismatches():
    original = _original_variables("cnn", (28, 28, 1))
    with pytest.raises(ValueError, match="fc2"):
        convert.flax_to_torch(original, torch_models.CNN(num_classes=7))
    with pytest.raises(ValueError, match="layout"):
        convert.flax_to_torch(
            _original_variables("resnet18_cifar", (8, 8, 3)), torch.nn.Linear(2, 2)
        )


# ----------------------------------------------------------------------------- CaMU steps


@pytest.mark.parametrize("after", [1, 10])
def test_camu_step_parity_cnn(after):
    """Free-running CaMU steps of the CNN, float64 on both sides."""
    _assert_camu_f64("cnn", 1, CONFIGS["cnn"].sizes, after)


def test_camu_step_parity_cnn_partial_last_batch():
    """Step 11 is short (20 of 32): JAX pads with mask zeros, PyTorch gets the short batch."""
    sizes = CONFIGS["cnn"].sizes
    assert sizes[-1] == 20
    _assert_camu_f64("cnn", 1, sizes, len(sizes))


def test_camu_step_parity_cnn_partial_batch_first_step():
    """A short batch (13 of 32) as the first step, where Adam has no history yet."""
    _assert_camu_f64("cnn", 5, (13,), 1)


@pytest.mark.parametrize("step", [1, 2, 3])
def test_camu_step_parity_resnet18_cifar(step):
    """CIFAR stem at 16x16, batch 8, BatchNorm in train mode; step 3 is short (5 of 8)."""
    _assert_camu_f64("resnet18_cifar", 1, CONFIGS["resnet18_cifar"].sizes, step)


@pytest.mark.parametrize("step", [1, 2])
def test_camu_step_parity_resnet18_imagenet_stem(step):
    """ImageNet stem (7x7/2 conv + max-pool) at 64x64, batch 4; step 2 is short (3 of 4)."""
    _assert_camu_f64("resnet18_imagenet", 1, CONFIGS["resnet18_imagenet"].sizes, step)


def test_parity_check_detects_a_changed_coefficient():
    """The comparison has teeth: out_forget 0.02 instead of 0.01 on the JAX side fails it, in
    the parameters, while L_rep (computed before step B) still matches."""
    c = CONFIGS["cnn"]
    sizes = c.sizes[:1]
    changed = _jax_camu("cnn", 1, sizes, np.float64, camu.CamuCoefficients(out_forget=0.02))
    torch_out = _torch_camu("cnn", 1, sizes, np.float64)
    lrs = {"kl_opt_state": c.kl_lr, "ce_opt_state": c.impair_lr}
    scales = _camu_loss_scales(c, sizes[0])
    problems = _f64_problems(c, changed, torch_out, 1, lrs, {"loss_rep": scales["loss_rep"]})
    assert any(p.startswith("params/") for p in problems), "a changed coefficient went unnoticed"
    assert not any(p.startswith("loss_rep") for p in problems), problems


def test_step_a_leaves_the_head_alone():
    """Step A must not touch the classifier head, as in the reference.

    L_rep depends on the embedding only, so in PyTorch the head's `.grad` stays None after
    `loss2.backward()` and `optimizer1.step()` skips it (no Adam update, no weight decay). Here
    step B is switched off (`ce_tx = set_to_zero`) and step A uses `adam_l2`, as
    `camu_jax.methods.camu` builds it: the head (fc2, fc3) must come out unchanged.
    """
    c = CONFIGS["cnn"]
    original = _original_variables(c.model, c.shape)
    batches = _camu_batches(1, c.sizes[:1], c.shape)
    model = create_model(c.model, num_classes=NUM_CLASSES)
    kl_tx, ce_tx = steps.adam_l2(c.kl_lr), optax.set_to_zero()
    step = jax.jit(functools.partial(camu.camu_step, model=model, kl_tx=kl_tx, ce_tx=ce_tx))
    embed = _jitted_embed(c.model)
    b = batches[0]
    mask = np.ones(c.batch, np.float32)
    batch = {
        "x_f": b["x_f"],
        "x_s": b["x_s"],
        "y_s": b["y_s"].astype(np.int32),
        "y_cf": b["y_cf"].astype(np.int32),
        "z0_s": embed(original, b["x_s"])[1],
        "z0_cf": embed(original, b["x_cf"])[1],
        "mask_f": mask,
        "mask_s": mask,
    }
    before = _host(original["params"])
    state, _ = step(camu.init_camu_state(original, kl_tx, ce_tx), batch)
    moved = {
        f"{name}/{leaf}": float(np.max(np.abs(state.params[name][leaf] - before[name][leaf])))
        for name in HEADS[c.model]
        for leaf in ("kernel", "bias")
    }
    assert not any(moved.values()), (
        f"step A moved the head (max |change| {moved}): camu_step applies kl_tx's weight decay "
        "and Adam update to parameters that get no gradient from L_rep; PyTorch's optimizer1 "
        "skips them"
    )


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("after", [1, 10, 11])
def test_train_step_parity_cnn(after):
    """Original training (Adam 1e-3, coupled weight decay 1e-4, CE), float64 on both sides;
    step 11 is short (20 of 32)."""
    c = CONFIGS["cnn"]
    j, t = _jax_train(c.sizes, np.float64), _torch_train(c.sizes, np.float64)
    scales = {"loss": lambda v: math.log(NUM_CLASSES) + abs(v)}
    problems = _f64_problems(c, j, t, after, {"opt_state": TRAIN_LR}, scales)
    assert not problems, f"step {after}, float64: " + "; ".join(problems)


# ----------------------------------------------------------------------------- float32


def _log_softmax(z) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl_sum_error(z_teacher, z_student) -> float:
    """First-order bound on one side's float32 error in KL_sum(softmax(z_t) || softmax(z_s)).

    Each embedding element is off by at most e = rho_f max |z| (as in the forward check); that
    reaches KL_b through its gradients, q - p for the student and p (log p - log q - KL_b) for
    the teacher, so by at most e times their 1-norms. The two D-term sums, of p log p and of
    p log q, add the rounding u sqrt(D) of their terms' magnitudes.
    """
    c = CONFIGS["cnn"]
    e = _rel_rounding(U32, c.depth, c.fan_in) * max(
        np.max(np.abs(z)) for z in (z_teacher, z_student)
    )
    lp, lq = _log_softmax(z_teacher), _log_softmax(z_student)
    p, q = np.exp(lp), np.exp(lq)
    kl = np.sum(p * (lp - lq), -1, keepdims=True)
    gradients = np.abs(q - p).sum(-1) + np.abs(p * (lp - lq - kl)).sum(-1)
    sums = U32 * math.sqrt(lp.shape[-1]) * np.sum(p * (np.abs(lp) + np.abs(lq)), -1)
    return float(np.sum(gradients * e + sums))


def _cross_entropy_error(logits, labels) -> float:
    """The same for the mean cross-entropy: gradient softmax - onehot; the log-sum-exp over C
    logits rounds at u sqrt(C) of its terms' size, max |logit| + log C."""
    c = CONFIGS["cnn"]
    e = _rel_rounding(U32, c.depth, c.fan_in) * float(np.max(np.abs(logits)))
    lp = _log_softmax(logits)
    gradients = np.abs(np.exp(lp) - np.eye(NUM_CLASSES)[labels]).sum(-1)
    sums = U32 * math.sqrt(NUM_CLASSES) * (np.max(np.abs(logits), -1) + math.log(NUM_CLASSES))
    return float(np.mean(gradients * e + sums))


@pytest.mark.parametrize("case", ["camu", "camu_short", "train"])
def test_first_step_losses_float32(case):
    """The first step's loss in float32 (L_rep; the training cross-entropy), computed by both
    sides from identical parameters: within both sides' first-order error bounds
    (`_kl_sum_error`, `_cross_entropy_error`) plus the rounding u sqrt(n) of the sum over the
    batch. At step 1 the CNN's student is its teacher, so both come from the original."""
    c = CONFIGS["cnn"]
    embed = _jitted_embed(c.model)
    if case == "train":
        sizes = c.sizes[:1]
        value = _jax_train(sizes, np.float32)[0]["loss"]
        reference = _torch_train(sizes, np.float32)[0]["loss"]
        b = _train_batches(2, sizes, c.shape)[0]
        with _precision(np.float32):
            logits, _ = embed(_original_variables(c.model, c.shape, seed=3), b["image"])
        error = _cross_entropy_error(logits, b["label"])
    else:
        seed, sizes = (1, c.sizes[:1]) if case == "camu" else (5, (13,))
        value = _jax_camu("cnn", seed, sizes, np.float32)[0]["loss_rep"]
        reference = _torch_camu("cnn", seed, sizes, np.float32)[0]["loss_rep"]
        b = _camu_batches(seed, sizes, c.shape)[0]
        with _precision(np.float32):
            variables = _original_variables(c.model, c.shape)
            z = {k: embed(variables, b[k])[1] for k in ("x_s", "x_f", "x_cf")}
        coef = camu.CamuCoefficients()
        error = coef.rep_sample * _kl_sum_error(z["x_s"], z["x_s"]) + coef.rep_forget * (
            _kl_sum_error(z["x_cf"], z["x_f"])
        )
    tol = 2 * (error + U32 * math.sqrt(sizes[0]) * abs(reference))
    assert abs(value - reference) <= tol, (
        f"{case}: JAX {value!r}, PyTorch {reference!r}, tol {tol:.3g}"
    )
