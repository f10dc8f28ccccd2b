"""Numerical parity of camu_jax with the PyTorch port of the reference (float32, CPU).

From identical weights (`camu_jax.convert`) and identical batches, the JAX steps (`camu_step`,
`train_step`) and the PyTorch port (`experiments.pytorch_reference`) must give the same losses
(rtol 1e-4) and the same parameters and BatchNorm running statistics (rtol 1e-4, atol 1e-5).
The JAX side pads a short last batch to the full size with mask zeros; PyTorch gets the short
batch, as its `DataLoader` serves it. The teacher embeddings z0_s, z0_cf come from the JAX
frozen model in eval mode and are passed in the batch (as `camu_step` expects); PyTorch
recomputes them every step, as the reference does.

Two facts of float32 Adam shape the comparison (see `_problems`):

* Adam's first steps are sign-like (update ~ lr * g / |g|), so an element whose gradient is at
  float32 noise level can move by +lr on one side and -lr on the other. A small fraction of such
  *outliers* is allowed, each bounded by what Adam can move an element; everything else must
  meet rtol 1e-4 / atol 1e-5. On the CNN that is a handful of ~450k elements.
* ResNet18 gradients with train-mode BatchNorm at batch 8 are only float32-accurate to about
  1e-3 relative in the first layers (PyTorch float32 against PyTorch float64 differs as much as
  JAX against PyTorch), so ~0.3 % of elements flip and free-running float32 trajectories drift
  apart chaotically over 10 steps. The ResNet checks therefore compare *each step from the same
  state*: PyTorch is loaded with the JAX state after step t-1 (parameters, running statistics
  and both Adam states) and must reproduce JAX's step t, for t = 1, 10 and 11. The CNN, which is
  well conditioned, is compared free-running over all 11 steps.

Learning rates: the reference's MNIST class preset (KL_LR 4e-4, IMPAIR_LR 1e-3) for the CNN and
its CIFAR class preset (1e-5, 5e-5) for ResNet18, the models the reference uses them with.

Step A's optimizer: PyTorch's Adam skips parameters whose `.grad` is None, and the classifier
head never gets a gradient from L_rep, so optimizer 1 never touches the head (no Adam update, no
weight decay). The optax counterpart is `adam_l2` restricted to the non-head parameters
(`_kl_tx`); `test_step_a_leaves_the_head_alone` checks what the library does with plain `adam_l2`.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import traverse_util  # noqa: E402

from camu_jax import convert, steps  # noqa: E402
from camu_jax.models import create_model  # noqa: E402
from experiments.pytorch_reference import camu as torch_camu  # noqa: E402
from experiments.pytorch_reference import models as torch_models  # noqa: E402
from experiments.pytorch_reference import train as torch_train  # noqa: E402

pytestmark = pytest.mark.torch

NUM_CLASSES = 10
LOSS_RTOL = 1e-4
RTOL, ATOL = 1e-4, 1e-5
TRAIN_LR = 1e-3
# Ten Adam steps at lr 1e-3 on random labels: float32 rounding flips ~0.1 % of the CNN's
# elements (PyTorch float32 against PyTorch float64 differs in ~24 % of them).
TRAIN_OUTLIER_FRACTION = 2e-3
# Adam moves an element by at most about lr * (1 - b1) / sqrt(1 - b2) ~ 3.2 lr per step.
ADAM_STEP_BOUND = 3.2
HEADS = {"cnn": ("fc2", "fc3"), "resnet18_cifar": ("fc",), "resnet18": ("fc",)}


class Config:
    def __init__(self, model, shape, batch, sizes, kl_lr, impair_lr, outlier_fraction):
        self.model, self.shape, self.batch, self.sizes = model, shape, batch, tuple(sizes)
        self.kl_lr, self.impair_lr = kl_lr, impair_lr
        self.outlier_fraction = outlier_fraction


CONFIGS = {
    # 10 full batches, then a short last one (20 of 32 / 5 of 8).
    "cnn": Config("cnn", (28, 28, 1), 32, [32] * 10 + [20], 4e-4, 1e-3, 5e-5),
    "resnet18_cifar": Config("resnet18_cifar", (32, 32, 3), 8, [8] * 10 + [5], 1e-5, 5e-5, 1e-2),
    "resnet18_imagenet": Config("resnet18", (64, 64, 3), 4, [4], 1e-5, 5e-5, 1e-2),
}


@pytest.fixture(scope="module", autouse=True)
def _deterministic_torch():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


# ----------------------------------------------------------------------------- data, weights


def _original_variables(name: str, shape, seed: int = 0) -> dict:
    """Random variables of the model's shapes (from `jax.eval_shape`, so no slow eager init):
    He-scaled kernels, small biases, and non-trivial BatchNorm parameters and running
    statistics, so the frozen model's eval mode and the new model's train mode really differ."""
    model = create_model(name, num_classes=NUM_CLASSES)
    shapes = jax.eval_shape(lambda: steps.init_variables(model, jax.random.key(seed), shape))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        kind, size = path[-1], leaf.shape
        if kind == "kernel":
            fan_in = int(np.prod(size[:-1]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), size)
        elif kind == "mean":
            value = rng.normal(0.0, 0.2, size)
        elif kind == "var":
            value = rng.uniform(0.5, 1.5, size)
        elif kind == "scale":
            value = rng.uniform(0.8, 1.2, size)
        else:  # biases
            value = rng.normal(0.0, 0.05, size)
        return jnp.asarray(value, jnp.float32)

    out = {}
    for collection, tree in shapes.items():
        flat = traverse_util.flatten_dict(tree) if tree else {}
        flat = {p: draw(p, v) for p, v in flat.items()}
        out[collection] = traverse_util.unflatten_dict(flat) if flat else {}
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


def _kl_tx(name: str, lr: float) -> optax.GradientTransformation:
    """Step A's optimizer as PyTorch's optimizer 1 acts: `adam_l2` on every parameter but the
    classifier head, which gets no gradient from L_rep and so is skipped by PyTorch."""
    head = HEADS[name]
    return optax.multi_transform(
        {"body": steps.adam_l2(lr), "head": optax.set_to_zero()},
        lambda params: {k: ("head" if k in head else "body") for k in params},
    )


@functools.cache
def _jitted_camu(config: str, coefficients: steps.CamuCoefficients):
    c = CONFIGS[config]
    model = create_model(c.model, num_classes=NUM_CLASSES)
    kl_tx, ce_tx = _kl_tx(c.model, c.kl_lr), steps.adam_l2(c.impair_lr)
    step = functools.partial(
        steps.camu_step, model=model, kl_tx=kl_tx, ce_tx=ce_tx, coefficients=coefficients
    )
    return jax.jit(step), kl_tx, ce_tx


@functools.cache
def _jitted_embed(name: str):
    model = create_model(name, num_classes=NUM_CLASSES)

    @jax.jit
    def embed(variables, x):
        _, z, _ = steps.apply_model(
            model, variables["params"], variables["batch_stats"], x, train=False
        )
        return z

    return embed


def _run_jax_camu(config: str, original, batches, coefficients) -> list[dict]:
    """JAX CaMU steps; per step the losses, the variables and the full state (host copies)."""
    c = CONFIGS[config]
    step, kl_tx, ce_tx = _jitted_camu(config, coefficients)
    embed = _jitted_embed(c.model)
    state = steps.init_camu_state(original, kl_tx, ce_tx)
    out = []
    for b in batches:
        n = b["y_s"].shape[0]
        p = {k: _pad(v, c.batch) for k, v in b.items()}
        batch = {
            "x_f": p["x_f"],
            "x_s": p["x_s"],
            "y_s": p["y_s"].astype(np.int32),
            "y_cf": p["y_cf"].astype(np.int32),
            "z0_s": embed(original, p["x_s"]),
            "z0_cf": embed(original, p["x_cf"]),
            "mask_f": _mask(n, c.batch),
            "mask_s": _mask(n, c.batch),
        }
        state, metrics = step(state, batch)
        assert bool(metrics["finite"])
        host = _host(state)
        out.append(
            {
                "loss_rep": float(metrics["loss_rep"]),
                "loss_out": float(metrics["loss_out"]),
                "variables": {"params": host.params, "batch_stats": host.batch_stats},
                "state": host,
            }
        )
    return out


# ----------------------------------------------------------------------------- PyTorch side


def _torch_model(name: str, variables: dict):
    module = torch_models.create_model(name, num_classes=NUM_CLASSES)
    convert.flax_to_torch(variables, module)
    return module


def _adam_state(opt_state) -> optax.ScaleByAdamState:
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(found) == 1, f"expected one Adam state, found {len(found)}"
    return found[0]


def _load_adam(optimizer, module, adam: optax.ScaleByAdamState) -> None:
    """Puts optax Adam moments into a `torch.optim.Adam` over `module`'s parameters; parameters
    without moments (the masked head of step A) get no state, as in PyTorch."""
    count = int(adam.count)
    if count == 0:
        return
    mu = convert.params_to_torch(adam.mu, module)
    nu = convert.params_to_torch(adam.nu, module)
    for key, param in module.named_parameters():
        if key in mu:
            optimizer.state[param] = {
                "step": torch.tensor(float(count)),
                "exp_avg": mu[key].clone(),
                "exp_avg_sq": nu[key].clone(),
            }


def _torch_setup(config: str, original, state):
    """PyTorch models and optimizers in a JAX `CamuState`'s state (None: the original's)."""
    c = CONFIGS[config]
    teacher = _torch_model(c.model, original)
    if state is None:
        new = copy.deepcopy(teacher)
    else:
        new = _torch_model(c.model, {"params": state.params, "batch_stats": state.batch_stats})
    teacher.eval()
    new.train()
    opt1, opt2 = torch_camu.make_optimizers(new, kl_lr=c.kl_lr, impair_lr=c.impair_lr)
    if state is not None:
        _load_adam(opt1, new, _adam_state(state.kl_opt_state))
        _load_adam(opt2, new, _adam_state(state.ce_opt_state))
    return new, opt1, opt2, teacher


def _run_torch_camu(config: str, original, batches, *, from_states=None) -> list[dict]:
    """Free-running PyTorch steps over `batches` (from_states None), or one step per batch from
    the given JAX states (teacher forcing)."""
    coefficients = torch_camu.Coefficients()
    out = []
    new = opt1 = opt2 = teacher = None
    for i, b in enumerate(batches):
        if from_states is not None or i == 0:
            state = None if from_states is None else from_states[i]
            new, opt1, opt2, teacher = _torch_setup(config, original, state)
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
            coefficients,
        )
        out.append(
            {
                "loss_rep": loss2.item(),
                "loss_out": loss4.item(),
                "variables": _host(convert.torch_to_flax(new, original)),
            }
        )
    return out


# ----------------------------------------------------------------------------- comparison


def _problems(jax_vars: dict, torch_vars: dict, *, outlier_fraction: float, bound: float):
    """What fails the comparison: BatchNorm statistics must meet rtol/atol everywhere;
    parameters everywhere but at most `outlier_fraction` of the elements, each off by at most
    `bound` (see the module docstring)."""
    problems = []
    a = traverse_util.flatten_dict(jax_vars["batch_stats"]) if jax_vars["batch_stats"] else {}
    b = traverse_util.flatten_dict(torch_vars["batch_stats"]) if torch_vars["batch_stats"] else {}
    assert a.keys() == b.keys()
    for path in sorted(a):
        if not np.allclose(a[path], b[path], rtol=RTOL, atol=ATOL):
            worst = float(np.max(np.abs(a[path] - b[path])))
            problems.append(f"batch_stats/{'/'.join(path)}: max |diff| {worst:.3g}")
    a = traverse_util.flatten_dict(jax_vars["params"])
    b = traverse_util.flatten_dict(torch_vars["params"])
    assert a.keys() == b.keys()
    total, outliers, worst = 0, 0, (0.0, "")
    for path in sorted(a):
        diff = np.abs(a[path] - b[path])
        bad = diff > ATOL + RTOL * np.abs(b[path])
        total += diff.size
        outliers += int(bad.sum())
        if bad.any() and diff.max() > worst[0]:
            worst = (float(diff.max()), "/".join(path))
    allowed = math.floor(outlier_fraction * total)
    if outliers > allowed:
        problems.append(f"params: {outliers} of {total} elements differ (allowed {allowed})")
    if worst[0] > bound:
        problems.append(f"params/{worst[1]}: max |diff| {worst[0]:.3g} > bound {bound:.3g}")
    return problems


def _assert_loss_close(jax_value: float, torch_value: float, what: str) -> None:
    np.testing.assert_allclose(jax_value, torch_value, rtol=LOSS_RTOL, atol=1e-7, err_msg=what)


def _camu_bound(c: Config, steps_taken: int) -> float:
    return 2 * ADAM_STEP_BOUND * (c.kl_lr + c.impair_lr) * steps_taken + ATOL


def _assert_camu_match(config: str, j: dict, t: dict, steps_taken: int, what: str) -> None:
    c = CONFIGS[config]
    _assert_loss_close(j["loss_rep"], t["loss_rep"], f"L_rep, {what}")
    _assert_loss_close(j["loss_out"], t["loss_out"], f"L_out, {what}")
    problems = _problems(
        j["variables"],
        t["variables"],
        outlier_fraction=c.outlier_fraction,
        bound=_camu_bound(c, steps_taken),
    )
    assert not problems, f"{what}: " + "; ".join(problems)


# ----------------------------------------------------------------------------- trajectories


@functools.cache
def _cnn_trajectories():
    """Free-running: 11 JAX steps and 11 PyTorch steps from the same original."""
    c = CONFIGS["cnn"]
    original = _original_variables(c.model, c.shape)
    batches = _camu_batches(1, c.sizes, c.shape)
    jax_out = _run_jax_camu("cnn", original, batches, steps.CamuCoefficients())
    return original, batches, jax_out, _run_torch_camu("cnn", original, batches)


@functools.cache
def _resnet_trajectories(config: str, compare_at: tuple[int, ...]):
    """JAX runs all steps; PyTorch redoes steps `compare_at` (1-based) from JAX's states."""
    c = CONFIGS[config]
    original = _original_variables(c.model, c.shape)
    batches = _camu_batches(1, c.sizes, c.shape)
    jax_out = _run_jax_camu(config, original, batches, steps.CamuCoefficients())
    states = [None if t == 1 else jax_out[t - 2]["state"] for t in compare_at]
    torch_out = _run_torch_camu(
        config, original, [batches[t - 1] for t in compare_at], from_states=states
    )
    return {t: (jax_out[t - 1], o) for t, o in zip(compare_at, torch_out, strict=True)}


@functools.cache
def _jitted_train(name: str):
    model = create_model(name, num_classes=NUM_CLASSES)
    tx = steps.adam_l2(TRAIN_LR)
    return jax.jit(functools.partial(steps.train_step, model=model, tx=tx)), tx


@functools.cache
def _train_trajectories():
    c = CONFIGS["cnn"]
    original = _original_variables(c.model, c.shape, seed=3)
    batches = _train_batches(2, c.sizes, c.shape)
    step, tx = _jitted_train(c.model)
    state = steps.init_train_state(original, tx)
    jax_out = []
    for b in batches:
        n = b["label"].shape[0]
        batch = {
            "image": _pad(b["image"], c.batch),
            "label": _pad(b["label"], c.batch).astype(np.int32),
            "mask": _mask(n, c.batch),
        }
        state, metrics = step(state, batch)
        jax_out.append(
            {
                "loss": float(metrics["loss"]),
                "variables": _host({"params": state.params, "batch_stats": state.batch_stats}),
            }
        )
    model = _torch_model(c.model, original)
    model.train()
    optimizer = torch_train.make_optimizer(model, lr=TRAIN_LR, weight_decay=1e-4)
    torch_out = []
    for b in batches:
        loss = torch_train.train_step(
            model, optimizer, _nchw(b["image"]), torch.from_numpy(b["label"]).long()
        )
        torch_out.append(
            {"loss": loss.item(), "variables": _host(convert.torch_to_flax(model, original))}
        )
    return jax_out, torch_out


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


def test_convert_forward_matches():
    for name, shape in (("cnn", (28, 28, 1)), ("resnet18_cifar", (16, 16, 3))):
        variables = _original_variables(name, shape)
        module = _torch_model(name, variables)
        module.eval()
        x = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
        logits, emb, _ = steps.apply_model(
            create_model(name, num_classes=NUM_CLASSES),
            variables["params"],
            variables["batch_stats"],
            x,
            train=False,
        )
        with torch.no_grad():
            t_logits, t_emb = module(_nchw(x))
        np.testing.assert_allclose(np.asarray(logits), t_logits.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(emb), t_emb.numpy(), rtol=1e-4, atol=1e-5)


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
    _, _, jax_out, torch_out = _cnn_trajectories()
    _assert_camu_match("cnn", jax_out[after - 1], torch_out[after - 1], after, f"step {after}")


def test_camu_step_parity_cnn_partial_last_batch():
    """Step 11 is short (20 of 32): JAX pads with mask zeros, PyTorch gets the short batch."""
    _, batches, jax_out, torch_out = _cnn_trajectories()
    assert batches[-1]["y_s"].shape[0] == 20
    _assert_camu_match("cnn", jax_out[-1], torch_out[-1], len(batches), "short step 11")


@pytest.mark.parametrize("after", [1, 10, 11])
def test_camu_step_parity_resnet18_cifar(after):
    """CIFAR stem, 32x32, batch 8, BatchNorm in train mode; step 11 is short (5 of 8)."""
    j, t = _resnet_trajectories("resnet18_cifar", (1, 10, 11))[after]
    _assert_camu_match("resnet18_cifar", j, t, 1, f"step {after} from the same state")


def test_camu_step_parity_resnet18_imagenet_stem():
    """ImageNet stem (7x7/2 conv + max-pool) at 64x64, batch 4, one step."""
    j, t = _resnet_trajectories("resnet18_imagenet", (1,))[1]
    _assert_camu_match("resnet18_imagenet", j, t, 1, "step 1")


def test_parity_check_detects_a_changed_coefficient():
    """The comparison has teeth: out_forget 0.02 instead of 0.01 on the JAX side fails it."""
    c = CONFIGS["cnn"]
    original, batches, _, torch_out = _cnn_trajectories()
    changed = steps.CamuCoefficients(out_forget=0.02)
    j = _run_jax_camu("cnn", original, batches[:1], changed)[0]
    t = torch_out[0]
    _assert_loss_close(j["loss_rep"], t["loss_rep"], "L_rep comes before the change")
    with pytest.raises(AssertionError):
        _assert_loss_close(j["loss_out"], t["loss_out"], "L_out")
    problems = _problems(
        j["variables"],
        t["variables"],
        outlier_fraction=c.outlier_fraction,
        bound=_camu_bound(c, 1),
    )
    assert problems, "a changed loss coefficient went unnoticed"


def test_step_a_leaves_the_head_alone():
    """Step A must not touch the classifier head, as in the reference.

    L_rep depends on the embedding only, so in PyTorch the head's `.grad` stays None after
    `loss2.backward()` and `optimizer1.step()` skips it (no Adam update, no weight decay). Here
    step B is switched off (`ce_tx = set_to_zero`) and step A uses `adam_l2`, as
    `camu_jax.unlearning` builds it: the head (fc2, fc3) must come out unchanged.
    """
    c = CONFIGS["cnn"]
    original, batches, _, _ = _cnn_trajectories()
    model = create_model(c.model, num_classes=NUM_CLASSES)
    kl_tx, ce_tx = steps.adam_l2(c.kl_lr), optax.set_to_zero()
    step = jax.jit(functools.partial(steps.camu_step, model=model, kl_tx=kl_tx, ce_tx=ce_tx))
    embed = _jitted_embed(c.model)
    b = batches[0]
    mask = np.ones(c.batch, np.float32)
    batch = {
        "x_f": b["x_f"],
        "x_s": b["x_s"],
        "y_s": b["y_s"].astype(np.int32),
        "y_cf": b["y_cf"].astype(np.int32),
        "z0_s": embed(original, b["x_s"]),
        "z0_cf": embed(original, b["x_cf"]),
        "mask_f": mask,
        "mask_s": mask,
    }
    before = _host(original["params"])
    state, _ = step(steps.init_camu_state(original, kl_tx, ce_tx), batch)
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
    """Original training (Adam 1e-3, coupled weight decay 1e-4, CE); step 11 is short."""
    jax_out, torch_out = _train_trajectories()
    j, t = jax_out[after - 1], torch_out[after - 1]
    _assert_loss_close(j["loss"], t["loss"], f"loss at step {after}")
    problems = _problems(
        j["variables"],
        t["variables"],
        outlier_fraction=TRAIN_OUTLIER_FRACTION,
        bound=ADAM_STEP_BOUND * TRAIN_LR * after * 2 + ATOL,
    )
    assert not problems, f"step {after}: " + "; ".join(problems)
