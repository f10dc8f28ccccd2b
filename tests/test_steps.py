"""Optimizer, train/CaMU/eval steps and BatchNorm masking (`camu_jax.steps`, `camu_jax.models`).

Compiling a step takes seconds on a busy CPU, so the tests share a few jitted functions with
fixed shapes (the CNN on 8x8x1 inputs, batches of 8, and the short batches of the padding
test), take the loss coefficients as a traced argument instead of recompiling for each, and
compile at XLA's lowest optimisation level (same semantics, ~40% less compile time). The
padding test runs on the CNN and on a small network built from the library's `BasicBlock`
and `BatchNorm`; on the full ResNet18 (CIFAR stem, 8x8 inputs) it takes minutes to compile
on CPU and runs only with CAMU_TEST_RESNET18=1.
"""

from __future__ import annotations

import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from camu_jax import models, steps
from camu_jax.methods import camu
from camu_jax.models import CNN, BatchNorm, ResNet18, create_model, state_variables
from camu_jax.models.resnet import BasicBlock

NUM_CLASSES = 5
CNN_INPUT = (8, 8, 1)
B = 8  # batch of the shared jitted steps
KL_LR, CE_LR, WD = 4e-4, 1e-3, 1e-4

CNN_MODEL = CNN(num_classes=NUM_CLASSES)
DEFAULT_COEFFICIENTS = (0.5, 0.5, 0.9, 0.01)  # the reference's (= CamuCoefficients())
DEFAULT = np.array(DEFAULT_COEFFICIENTS, np.float32)
ZERO = np.zeros(4, np.float32)

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
KL_TX = steps.adam_l2(KL_LR, WD)
CE_TX = steps.adam_l2(CE_LR, WD)


# ---------------------------------------------------------------------------- helpers


def _random_variables(model: nn.Module, input_shape, seed: int) -> dict:
    """Variables of `model` with the init's shapes but numpy values (no init compile):
    He-uniform kernels, small biases, BatchNorm scales and running statistics off 0/1."""
    shapes = jax.eval_shape(
        lambda k: models.init_variables(model, k, input_shape), jax.random.key(0)
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            bound = np.sqrt(6.0 / np.prod(leaf.shape[:-1]))
            value = rng.uniform(-bound, bound, leaf.shape)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:  # biases, BatchNorm bias and running mean
            value = rng.uniform(-0.1, 0.1, leaf.shape)
        return value.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _camu_batch(
    rng, b: int, input_shape, emb_dim: int, *, real: int | None = None, real_s: int | None = None
) -> dict:
    """A CaMU batch; rows from `real` (D_f side) / `real_s` (D_s side, default `real`) on are
    padding (mask 0) filled with large garbage."""
    real = b if real is None else real
    real_s = real if real_s is None else real_s
    batch = {
        "x_f": rng.normal(size=(b, *input_shape)),
        "x_s": rng.normal(size=(b, *input_shape)),
        "y_s": rng.integers(0, NUM_CLASSES, b),
        "y_cf": rng.integers(0, NUM_CLASSES, b),
        "z0_s": 2 * rng.normal(size=(b, emb_dim)),
        "z0_cf": 2 * rng.normal(size=(b, emb_dim)),
        "mask_f": (np.arange(b) < real),
        "mask_s": (np.arange(b) < real_s),
    }
    for k, n in (("x_f", real), ("z0_cf", real), ("x_s", real_s), ("z0_s", real_s)):
        batch[k][n:] = 50.0 + 100.0 * rng.normal(size=batch[k][n:].shape)
    return _typed(batch)


def _take(batch: dict, n_f: int, n_s: int) -> dict:
    """The unpadded short batch: the first `n_f` D_f rows and `n_s` D_s rows."""
    return {k: v[: n_s if k in ("x_s", "y_s", "z0_s", "mask_s") else n_f] for k, v in batch.items()}


def _train_batch(rng, b: int, input_shape, *, real: int | None = None) -> dict:
    real = b if real is None else real
    image = rng.normal(size=(b, *input_shape))
    image[real:] = 50.0 + 100.0 * rng.normal(size=image[real:].shape)
    return _typed(
        {"image": image, "label": rng.integers(0, NUM_CLASSES, b), "mask": np.arange(b) < real}
    )


def _typed(batch: dict) -> dict:
    """float32 inputs and masks, int32 labels: fixed dtypes, so no retracing."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = v.astype(np.int32) if k in ("y_s", "y_cf", "label") else v.astype(np.float32)
    return out


def _assert_same_structure(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype


def _assert_tree_close(a, b, *, rtol, atol=0.0, scaled_atol=0.0):
    """allclose per leaf; `scaled_atol` adds `scaled_atol * max|leaf of b|` to `atol`."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        x, y = np.asarray(x), np.asarray(y)
        tol = atol + scaled_atol * (float(np.max(np.abs(y))) if y.size else 0.0)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=tol, err_msg=jax.tree_util.keystr(path))


def _np_adam_l2(params, grads_seq, *, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """PyTorch `Adam(lr, weight_decay=wd)` in float64, one leaf: yields params after each step."""
    p = np.asarray(params, np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads_seq, start=1):
        g = np.asarray(g, np.float64) + wd * p  # coupled L2
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        yield p


def _cnn_camu(state, batch, coefficients):
    """`camu_step` with the coefficients (rep_sample, rep_forget, out_sample, out_forget) as a
    traced `[4]` array, so that one compilation serves all of them."""
    return camu.camu_step(
        state,
        batch,
        model=CNN_MODEL,
        kl_tx=KL_TX,
        ce_tx=CE_TX,
        coefficients=camu.CamuCoefficients(*coefficients),
    )


def _cnn_train(state, batch):
    return steps.train_step(state, batch, model=CNN_MODEL, tx=CE_TX)


_cnn_logits = jit(
    lambda v, x: models.apply_model(CNN_MODEL, v["params"], v["batch_stats"], x, train=False)[0]
)


@pytest.fixture(scope="module")
def cnn_variables():
    return _random_variables(CNN_MODEL, CNN_INPUT, seed=0)


@pytest.fixture(scope="module")
def cnn_camu(cnn_variables):
    """The jitted CNN CaMU step for batches of B, shared by this module's tests; it fails if
    any of them makes it retrace."""
    chex.clear_trace_counter()
    return jit(chex.assert_max_traces(_cnn_camu, n=1))


@pytest.fixture(scope="module")
def cnn_train():
    return jit(chex.assert_max_traces(_cnn_train, n=1))


@pytest.fixture(scope="module")
def camu_state0(cnn_variables):
    return camu.init_camu_state(cnn_variables, KL_TX, CE_TX)


# ---------------------------------------------------------------------------- adam_l2


def test_adam_l2_is_pytorch_adam_with_coupled_l2():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(2, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    params["b"][1] = 0.5
    grads_seq = [
        {k: rng.normal(size=v.shape).astype(np.float32) * s for k, v in params.items()}
        for s in (1.0, 0.1, 3.0)
    ]
    lr, wd = 1e-2, 0.05  # a large decay so that the coupled form is visible
    tx = steps.adam_l2(lr, wd)
    update = jit(tx.update)
    state, p = tx.init(params), params
    jax_steps = []
    for g in grads_seq:
        updates, state = update(g, state, p)
        p = optax.apply_updates(p, updates)
        jax_steps.append(p)
    for k in params:
        expected = _np_adam_l2(params[k], [g[k] for g in grads_seq], lr=lr, wd=wd)
        for step, (got, want) in enumerate(zip(jax_steps, expected, strict=True)):
            np.testing.assert_allclose(
                np.asarray(got[k]), want, rtol=1e-5, atol=1e-4 * lr, err_msg=f"{k} step {step}"
            )

    # First step by hand: m_hat = g', v_hat = g'^2, so the update is lr * g' / (|g'| + eps).
    g1 = grads_seq[0]["w"].astype(np.float64) + wd * params["w"]
    by_hand = params["w"] - lr * g1 / (np.abs(g1) + 1e-8)
    np.testing.assert_allclose(np.asarray(jax_steps[0]["w"]), by_hand, rtol=1e-5)

    # Not AdamW: decoupled decay (moments of g alone, then - lr * wd * p) is another step.
    g0 = grads_seq[0]["w"].astype(np.float64)
    adamw = params["w"] - lr * g0 / (np.abs(g0) + 1e-8) - lr * wd * params["w"]
    assert not np.allclose(np.asarray(jax_steps[0]["w"]), adamw, rtol=1e-4, atol=1e-6)


def test_adam_l2_default_weight_decay():
    # Default weight decay is the reference's 1e-4: zero gradient, first step moves by
    # lr * sign(p) up to eps.
    p = {"w": np.array([0.5, -2.0, 1e-2], np.float32)}
    tx = steps.adam_l2(1e-3)
    u, _ = tx.update({"w": np.zeros(3, np.float32)}, tx.init(p), p)
    expected = -1e-3 * (1e-4 * p["w"]) / (np.abs(1e-4 * p["w"]) + 1e-8)
    np.testing.assert_allclose(np.asarray(u["w"]), expected, rtol=1e-5)


# ---------------------------------------------------------------------------- train_step


def test_train_step_structure_metrics_no_retrace(cnn_variables, cnn_train):
    tx = CE_TX
    state = steps.init_train_state(cnn_variables, tx)
    assert int(state.step) == 0 and state.step.dtype == jnp.int32
    rng = np.random.default_rng(1)
    first_loss = None
    for i in range(4):  # new data every step, some with padding
        batch = _train_batch(rng, B, CNN_INPUT, real=B - i)
        new, metrics = cnn_train(state, batch)
        _assert_same_structure(new, state)
        assert int(new.step) == i + 1
        assert set(metrics) == {"loss", "finite"}
        assert all(v.shape == () for v in metrics.values())
        assert metrics["finite"].dtype == jnp.bool_ and bool(metrics["finite"])
        assert metrics["loss"].dtype == jnp.float32 and float(metrics["loss"]) > 0
        if first_loss is None:
            first_loss = float(metrics["loss"])
            # The loss is the masked cross-entropy of the model before the step.
            logits = np.asarray(_cnn_logits(state_variables(state), batch["image"]), np.float64)
            log_p = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
            np.testing.assert_allclose(
                first_loss, -np.mean(log_p[np.arange(B), batch["label"]]), rtol=1e-5
            )
        assert not np.array_equal(
            np.asarray(new.params["fc3"]["kernel"]), np.asarray(state.params["fc3"]["kernel"])
        )
        state = new
    assert state.batch_stats == {}


def test_train_step_nan_input_is_not_finite(cnn_variables, cnn_train):
    state = steps.init_train_state(cnn_variables, CE_TX)
    batch = _train_batch(np.random.default_rng(2), B, CNN_INPUT)
    batch["image"][3, 2, 2, 0] = np.nan
    _, metrics = cnn_train(state, batch)
    assert not bool(metrics["finite"])
    assert np.isnan(float(metrics["loss"]))


# ---------------------------------------------------------------------------- camu_step


def test_camu_step_structure_metrics_no_retrace(camu_state0, cnn_camu):
    state = camu_state0
    assert int(state.step) == 0
    rng = np.random.default_rng(3)
    for i in range(4):  # new data every step, some with padding
        batch = _camu_batch(rng, B, CNN_INPUT, 256, real=B - 2 * (i % 2))
        new, metrics = cnn_camu(state, batch, DEFAULT)
        _assert_same_structure(new, state)
        assert int(new.step) == i + 1
        assert set(metrics) == {"loss_rep", "loss_out", "finite"}
        assert all(v.shape == () for v in metrics.values())
        assert metrics["finite"].dtype == jnp.bool_ and bool(metrics["finite"])
        assert float(metrics["loss_rep"]) > 0 and float(metrics["loss_out"]) > 0
        # Both optimizer states advance once per step.
        for opt_state in (new.kl_opt_state, new.ce_opt_state):
            assert int(opt_state[1].count) == i + 1
        state = new


def test_init_camu_state_copies_the_original(cnn_variables):
    state = camu.init_camu_state(cnn_variables, KL_TX, CE_TX)
    _assert_same_structure(state.params, cnn_variables["params"])
    for a, b in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(cnn_variables["params"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.kl_opt_state[1].count) == 0 and int(state.ce_opt_state[1].count) == 0


@pytest.mark.parametrize("where", ["x_f", "x_s", "z0_cf"])
def test_camu_step_nan_input_is_not_finite(camu_state0, cnn_camu, where):
    batch = _camu_batch(np.random.default_rng(4), B, CNN_INPUT, 256)
    batch[where][1] = np.nan
    _, metrics = cnn_camu(camu_state0, batch, DEFAULT)
    assert not bool(metrics["finite"])


def test_camu_step_is_deterministic(camu_state0, cnn_camu):
    batch = _camu_batch(np.random.default_rng(5), B, CNN_INPUT, 256, real=6)
    a, ma = cnn_camu(camu_state0, batch, DEFAULT)
    b, mb = cnn_camu(camu_state0, batch, DEFAULT)
    for x, y in zip(jax.tree.leaves((a, ma)), jax.tree.leaves((b, mb)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# optax forms Adam's bias corrections in float32 (1 - 0.999 is off by ~1e-5 relative), so each
# update carries a relative error ~1e-5: compare to float64 within a fraction of a step (lr).
DECAY_ATOL = 1e-4 * CE_LR


def _decay_only(params, *, lr_a, lr_b, steps_: int, heads=("fc2", "fc3")):
    """float64 params after `steps_` CaMU steps whose losses have zero gradient: per step an
    Adam-L2 update with the step-A moments (skipped for the head, which PyTorch's optimizer1
    never updates: it gets no gradient from L_rep), then one with the step-B moments."""

    def leaf(p, head):
        p = np.asarray(p, np.float64)
        m, v = {"a": 0.0, "b": 0.0}, {"a": 0.0, "b": 0.0}
        for t in range(1, steps_ + 1):
            for opt, lr in (("a", lr_a), ("b", lr_b)):
                if head and opt == "a":
                    continue
                g = WD * p
                m[opt] = 0.9 * m[opt] + 0.1 * g
                v[opt] = 0.999 * v[opt] + 0.001 * g * g
                p = p - lr * (m[opt] / (1 - 0.9**t)) / (np.sqrt(v[opt] / (1 - 0.999**t)) + 1e-8)
        return p

    return {k: jax.tree.map(lambda p, h=k in heads: leaf(p, h), sub) for k, sub in params.items()}


def test_camu_coefficients_defaults():
    assert camu.CamuCoefficients() == camu.CamuCoefficients(*DEFAULT_COEFFICIENTS)
    c = camu.CamuCoefficients()
    assert (c.rep_sample, c.rep_forget, c.out_sample, c.out_forget) == (0.5, 0.5, 0.9, 0.01)


def test_camu_step_zero_coefficients_only_decays(camu_state0, cnn_camu):
    rng = np.random.default_rng(6)
    state = camu_state0
    for _ in range(2):
        state, metrics = cnn_camu(state, _camu_batch(rng, B, CNN_INPUT, 256), ZERO)
        assert float(metrics["loss_rep"]) == 0.0 and float(metrics["loss_out"]) == 0.0
        assert bool(metrics["finite"])
    expected = _decay_only(camu_state0.params, lr_a=KL_LR, lr_b=CE_LR, steps_=2)
    _assert_tree_close(state.params, expected, rtol=1e-5, atol=DECAY_ATOL)
    assert int(state.step) == 2


def test_camu_step_all_padding_only_decays(camu_state0, cnn_camu):
    # The same with default coefficients and a batch that is all padding: masked losses are
    # 0 with 0 gradient, so again only the coupled decay moves the params.
    batch = _camu_batch(np.random.default_rng(7), B, CNN_INPUT, 256, real=0)
    state, metrics = cnn_camu(camu_state0, batch, DEFAULT)
    assert float(metrics["loss_rep"]) == 0.0 and float(metrics["loss_out"]) == 0.0
    expected = _decay_only(camu_state0.params, lr_a=KL_LR, lr_b=CE_LR, steps_=1)
    _assert_tree_close(state.params, expected, rtol=1e-5, atol=DECAY_ATOL)


class _TinyResNet(nn.Module):
    """One library BasicBlock with its strided downsample branch (three masked BatchNorms),
    global average pooling and a linear head: ResNet18 in miniature."""

    num_classes: int = NUM_CLASSES
    head_modules = ("fc",)

    @nn.compact
    def __call__(self, x, *, train: bool = False, mask=None):
        x = BasicBlock(8, 2, name="layer1")(x, train=train, mask=mask)
        embedding = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(embedding), embedding


_RESNET18 = pytest.param(
    "resnet18_cifar",
    marks=pytest.mark.skipif(
        os.environ.get("CAMU_TEST_RESNET18") != "1",
        reason="compiles for minutes on CPU; set CAMU_TEST_RESNET18=1",
    ),
)

# Plain SGD in the padding tests: its update is linear in the gradient, so rounding-level
# differences stay rounding-level. Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g):
# in a BatchNorm network many gradients are ~0 and float32 reduction order (batch 8 vs 5)
# flips their signs, moving those params by 2 * lr (seen on ResNet18). SGD also catches a
# wrong normalisation (e.g. a mean over the padded batch size), to which Adam is blind.
# ResNet18 gets a small step and a looser update tolerance: its layer4 normalises 4-5 values
# per channel (1x1 maps), so its gradients are ill-conditioned. Measured between the padded
# and the short batch: step-A and step-B gradients at the same params agree to 1e-4 of their
# largest element, but once step A has moved the params, the rounding-level difference in
# them grows in step B to ~1% of the update at lr 1e-4 and ~20% at lr 1e-3. A mask leak or a
# wrong normalisation changes the updates by far more (the garbage rows are ~100x larger).
PADDING_CASES = {  # name: (SGD learning rate, tolerance of the updates relative to their max)
    "cnn": (0.05, 1e-4),
    "tiny_resnet": (0.05, 1e-4),
    "resnet18_cifar": (1e-4, 3e-2),
}


@pytest.mark.parametrize("name", ["cnn", "tiny_resnet", _RESNET18])
def test_camu_step_padded_batch_equals_short_batch(name):
    if name == "cnn":
        model, input_shape, emb = CNN_MODEL, CNN_INPUT, 256
    elif name == "tiny_resnet":
        model, input_shape, emb = _TinyResNet(), (8, 8, 3), 8
    else:
        model, input_shape, emb = create_model(name, num_classes=NUM_CLASSES), (8, 8, 3), 512
    lr, update_tol = PADDING_CASES[name]
    sgd = optax.sgd(lr)
    variables = _random_variables(model, input_shape, seed=9)
    assert bool(variables["batch_stats"]) == (name != "cnn")
    state = camu.init_camu_state(variables, sgd, sgd)
    step = jit(functools.partial(camu.camu_step, model=model, kl_tx=sgd, ce_tx=sgd))
    # 5 real D_f rows and 4 real D_s rows; large garbage in the padding rows.
    padded = _camu_batch(np.random.default_rng(10), B, input_shape, emb, real=5, real_s=4)
    assert np.abs(padded["x_f"][5:]).max() > 10 and np.abs(padded["z0_s"][4:]).max() > 10
    short = _take(padded, 5, 4)
    assert short["x_f"].shape[0] == 5 and short["y_s"].shape[0] == 4
    (got, m_got), (want, m_want) = step(state, padded), step(state, short)

    assert bool(m_got["finite"]) and bool(m_want["finite"])
    for k in ("loss_rep", "loss_out"):
        np.testing.assert_allclose(float(m_got[k]), float(m_want[k]), rtol=1e-5)
    _assert_tree_close(got.params, want.params, rtol=1e-5, atol=1e-5)
    _assert_tree_close(got.batch_stats, want.batch_stats, rtol=1e-5, atol=1e-5)
    # The updates themselves (not only the params they are small against) agree, up to
    # `update_tol` of their largest element plus the float32 rounding of the params.
    for (path, p_got), p_want, p0 in zip(
        jax.tree_util.tree_leaves_with_path(got.params),
        jax.tree.leaves(want.params),
        jax.tree.leaves(state.params),
        strict=True,
    ):
        p_got, p_want, p0 = (np.asarray(a, np.float64) for a in (p_got, p_want, p0))
        rounding = 4 * np.finfo(np.float32).eps * np.max(np.abs(p0))
        np.testing.assert_allclose(
            p_got - p0,
            p_want - p0,
            rtol=update_tol,
            atol=update_tol * np.max(np.abs(p_want - p0)) + rounding,
            err_msg=jax.tree_util.keystr(path),
        )
    if name != "cnn":  # the running statistics did move (four train-mode passes per step)
        moved = jax.tree.map(
            lambda new, old: float(np.max(np.abs(np.asarray(new) - np.asarray(old)))),
            got.batch_stats,
            state.batch_stats,
        )
        assert min(jax.tree.leaves(moved)) > 1e-3


# ---------------------------------------------------------------------------- BatchNorm


@functools.partial(jit, static_argnames="train")
def _bn_apply(variables, x, mask, *, train):
    return BatchNorm().apply(variables, x, train=train, mask=mask, mutable=["batch_stats"])


@pytest.fixture(scope="module")
def bn_case():
    rng = np.random.default_rng(11)
    c = 4
    x = rng.normal(size=(6, 3, 3, c)).astype(np.float32) * 2 + 1
    x[4:] = 1e3 * rng.normal(size=x[4:].shape)  # padding rows: garbage
    mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
    variables = {
        "params": {
            "scale": rng.uniform(0.5, 2, c).astype(np.float32),
            "bias": rng.normal(size=c).astype(np.float32),
        },
        "batch_stats": {
            "mean": rng.normal(size=c).astype(np.float32),
            "var": rng.uniform(0.5, 2, c).astype(np.float32),
        },
    }
    return x, mask, variables


def test_batchnorm_masked_statistics_match_numpy(bn_case):
    x, mask, variables = bn_case
    y, updates = _bn_apply(variables, x, mask, train=True)
    kept = x[mask > 0].reshape(-1, x.shape[-1]).astype(np.float64)  # 4 * 3 * 3 values each
    mean, var_biased, var_unbiased = kept.mean(0), kept.var(0), kept.var(0, ddof=1)
    stats = variables["batch_stats"]
    np.testing.assert_allclose(
        np.asarray(updates["batch_stats"]["mean"]), 0.9 * stats["mean"] + 0.1 * mean, rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(updates["batch_stats"]["var"]),
        0.9 * stats["var"] + 0.1 * var_unbiased,
        rtol=1e-5,
    )
    # The output is normalised with the biased variance (as PyTorch), padding rows included.
    p = variables["params"]
    expected = (x - mean) / np.sqrt(var_biased + 1e-5) * p["scale"] + p["bias"]
    np.testing.assert_allclose(np.asarray(y)[:4], expected[:4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y)[4:], expected[4:], rtol=1e-4)
    # Same as the unpadded batch.
    y_short, updates_short = _bn_apply(variables, x[:4], None, train=True)
    np.testing.assert_allclose(np.asarray(y_short), np.asarray(y)[:4], rtol=1e-5, atol=1e-5)
    _assert_tree_close(updates_short, updates, rtol=1e-5, atol=1e-7)


def test_batchnorm_eval_uses_running_statistics(bn_case):
    x, mask, variables = bn_case
    y, updates = _bn_apply(variables, x, mask, train=False)
    stats, p = variables["batch_stats"], variables["params"]
    expected = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * p["scale"] + p["bias"]
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-4)
    _assert_tree_close(updates["batch_stats"], stats, rtol=0, atol=0)


def test_apply_model_without_batch_stats_returns_them_unchanged(cnn_variables):
    x = jax.ShapeDtypeStruct((2, *CNN_INPUT), jnp.float32)
    for train in (False, True):
        logits, emb, stats = jax.eval_shape(
            functools.partial(models.apply_model, CNN_MODEL, train=train),
            cnn_variables["params"],
            {},
            x,
        )
        assert logits.shape == (2, NUM_CLASSES) and emb.shape == (2, 256) and stats == {}


# ---------------------------------------------------------------------------- create_model


def test_create_model():
    assert create_model("cnn", num_classes=7) == CNN(num_classes=7)
    assert create_model("resnet18", num_classes=3) == ResNet18(num_classes=3, stem="imagenet")
    assert create_model("resnet18_cifar", num_classes=3) == ResNet18(num_classes=3, stem="cifar")
    with pytest.raises(ValueError, match=r"unknown model 'vgg'.*cnn, resnet18, resnet18_cifar"):
        create_model("vgg", num_classes=3)


@pytest.mark.parametrize(
    "shape, kernel_shape, stride, padding",
    [
        ((32, 14, 14, 16), (5, 5, 16, 32), 1, 2),  # the CNN's conv2: chunked on CPU
        ((16, 8, 8, 4), (3, 3, 4, 6), 1, 1),  # a ResNet 3x3: chunked on CPU
        ((16, 8, 8, 4), (3, 3, 4, 6), 2, 1),  # stride 2: plain
        ((12, 8, 8, 4), (3, 3, 4, 6), 1, 1),  # batch not a multiple of 8: plain
    ],
)
def test_conv2d_matches_lax_conv_values_and_gradients(shape, kernel_shape, stride, padding):
    """`conv2d` (whose CPU weight gradient is summed over chunks of 8 examples) computes
    `lax.conv_general_dilated` with PyTorch's symmetric padding, gradients included."""
    from camu_jax.models import layers

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    k = jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32)

    def plain(x, k):
        pad = ((padding, padding), (padding, padding))
        return jax.lax.conv_general_dilated(
            x, k, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def ours(x, k):
        return layers.conv2d(x, k, stride=stride, padding=padding)

    y_plain, y_ours = plain(x, k), jax.jit(ours)(x, k)
    np.testing.assert_allclose(y_ours, y_plain, rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.standard_normal(y_plain.shape), jnp.float32)

    def grads(f):
        return jax.jit(jax.grad(lambda x, k: jnp.vdot(f(x, k), g), argnums=(0, 1)))(x, k)

    for a, b in zip(grads(ours), grads(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_conv_module_has_nn_conv_parameters():
    """`layers.Conv` initialises the same `kernel`/`bias` as `nn.Conv` (checkpoints and
    `experiments.pytorch_reference.convert` rely on the names and shapes)."""
    from camu_jax.models import layers

    x = jnp.ones((2, 6, 6, 3))
    ours = layers.Conv(4, 3, padding=1).init(jax.random.key(0), x)
    ref = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1))).init(jax.random.key(0), x)
    chex.assert_trees_all_equal(ours, ref)
    np.testing.assert_allclose(
        layers.Conv(4, 3, padding=1).apply(ours, x),
        nn.Conv(4, (3, 3), padding=((1, 1), (1, 1))).apply(ref, x),
        rtol=1e-6,
    )
