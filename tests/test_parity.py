"""Numerical parity of camu_jax with the PyTorch port of the reference (float32, CPU).

From identical weights (`camu_jax.convert`) and identical batches, the JAX steps (`camu_step`,
`train_step`) and the PyTorch port (`experiments.pytorch_reference`) must give the same losses
(rtol 1e-4) and the same parameters and BatchNorm running statistics (rtol 1e-4, atol 1e-5)
after 1 and 10 steps. The JAX side pads a short last batch to the full size with mask zeros;
PyTorch gets the short batch, as its `DataLoader` serves it.

The teacher embeddings z0_s, z0_cf come from the JAX frozen model in eval mode and are passed in
the batch (as `camu_step` expects); PyTorch recomputes them every step (as the reference does).

Learning rates are the reference's MNIST class preset (KL_LR 4e-4, IMPAIR_LR 1e-3) for every
model: the CIFAR presets (1e-5 / 5e-5) would move the weights too little to test much.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402

from camu_jax import convert, steps  # noqa: E402
from camu_jax.models import create_model  # noqa: E402
from experiments.pytorch_reference import camu as torch_camu  # noqa: E402
from experiments.pytorch_reference import models as torch_models  # noqa: E402
from experiments.pytorch_reference import train as torch_train  # noqa: E402

pytestmark = pytest.mark.torch

KL_LR, IMPAIR_LR, TRAIN_LR = 1e-5, 5e-5, 1e-3
LOSS_RTOL = 1e-4
RTOL, ATOL = 1e-4, 1e-5
NUM_CLASSES = 10

# name -> (model, input shape HWC, batch size, step sizes: full batches then a short last one)
CONFIGS = {
    "cnn": ("cnn", (28, 28, 1), 32, [32] * 10 + [20]),
    "resnet18_cifar": ("resnet18_cifar", (32, 32, 3), 8, [8] * 10 + [5]),
    "resnet18_imagenet": ("resnet18", (64, 64, 3), 4, [4]),
}


@pytest.fixture(scope="module", autouse=True)
def _deterministic_torch():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


# ----------------------------------------------------------------------------- helpers


def _original_variables(name: str, shape, seed: int = 0) -> dict:
    """Initial variables with non-trivial BatchNorm parameters and running statistics, so the
    frozen model's eval mode and the new model's train mode really differ."""
    model = create_model(name, num_classes=NUM_CLASSES)
    variables = steps.init_variables(model, jax.random.key(seed), shape)
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        leaf = np.asarray(leaf)
        if path[-1] == "mean":
            return jnp.asarray(rng.normal(0.0, 0.2, leaf.shape), jnp.float32)
        if path[-1] == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        if path[-1] == "scale":
            return jnp.asarray(rng.uniform(0.8, 1.2, leaf.shape), jnp.float32)
        if path[-1] == "bias" and "bn" in "/".join(path):
            return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape), jnp.float32)
        return jnp.asarray(leaf)

    out = {}
    for collection, tree in variables.items():
        flat = traverse_util.flatten_dict(tree) if tree else {}
        flat = {p: perturb(p, v) for p, v in flat.items()}
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


def _torch_dtype(variables: dict):
    dtype = jax.tree.leaves(variables["params"])[0].dtype
    return torch.float64 if dtype == np.float64 else torch.float32


def _nchw(x: np.ndarray):
    # A fresh C-order copy: canonical NCHW strides, as a DataLoader batch has.
    return torch.from_numpy(np.array(x.transpose(0, 3, 1, 2), order="C", copy=True))


def _host(variables: dict) -> dict:
    return jax.tree.map(lambda a: np.array(a, copy=True), dict(variables))


def _torch_variables(module, template: dict) -> dict:
    return _host(convert.torch_to_flax(module, template))


@functools.lru_cache(maxsize=None)
def _jitted_camu(name: str, coefficients: steps.CamuCoefficients):
    model = create_model(name, num_classes=NUM_CLASSES)
    kl_tx, ce_tx = steps.adam_l2(KL_LR), steps.adam_l2(IMPAIR_LR)
    step = functools.partial(
        steps.camu_step, model=model, kl_tx=kl_tx, ce_tx=ce_tx, coefficients=coefficients
    )
    return jax.jit(step), kl_tx, ce_tx


@functools.lru_cache(maxsize=None)
def _jitted_embed(name: str):
    model = create_model(name, num_classes=NUM_CLASSES)

    @jax.jit
    def embed(variables, x):
        _, z, _ = steps.apply_model(
            model, variables["params"], variables["batch_stats"], x, train=False
        )
        return z

    return embed


@functools.lru_cache(maxsize=None)
def _jitted_train(name: str):
    model = create_model(name, num_classes=NUM_CLASSES)
    tx = steps.adam_l2(TRAIN_LR)
    return jax.jit(functools.partial(steps.train_step, model=model, tx=tx)), tx


def _run_jax_camu(name, original, batches, batch_size, coefficients) -> list[dict]:
    step, kl_tx, ce_tx = _jitted_camu(name, coefficients)
    embed = _jitted_embed(name)
    state = steps.init_camu_state(original, kl_tx, ce_tx)
    out = []
    for b in batches:
        n = b["y_s"].shape[0]
        p = {k: _pad(v, batch_size) for k, v in b.items()}
        batch = {
            "x_f": p["x_f"],
            "x_s": p["x_s"],
            "y_s": p["y_s"].astype(np.int32),
            "y_cf": p["y_cf"].astype(np.int32),
            "z0_s": embed(original, p["x_s"]),
            "z0_cf": embed(original, p["x_cf"]),
            "mask_f": _mask(n, batch_size),
            "mask_s": _mask(n, batch_size),
        }
        state, metrics = step(state, batch)
        assert bool(metrics["finite"])
        out.append(
            {
                "loss_rep": float(metrics["loss_rep"]),
                "loss_out": float(metrics["loss_out"]),
                "variables": _host({"params": state.params, "batch_stats": state.batch_stats}),
            }
        )
    return out


def _run_torch_camu(name, original, batches, coefficients) -> list[dict]:
    teacher = torch_models.create_model(name, num_classes=NUM_CLASSES)
    teacher.to(_torch_dtype(original))
    convert.flax_to_torch(original, teacher)
    new = copy.deepcopy(teacher)
    teacher.eval()
    new.train()
    opt1, opt2 = torch_camu.make_optimizers(new, kl_lr=KL_LR, impair_lr=IMPAIR_LR)
    out = []
    for b in batches:
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
                "variables": _torch_variables(new, original),
            }
        )
    return out


def _run_jax_train(name, original, batches, batch_size) -> list[dict]:
    step, tx = _jitted_train(name)
    state = steps.init_train_state(original, tx)
    out = []
    for b in batches:
        n = b["label"].shape[0]
        batch = {
            "image": _pad(b["image"], batch_size),
            "label": _pad(b["label"], batch_size).astype(np.int32),
            "mask": _mask(n, batch_size),
        }
        state, metrics = step(state, batch)
        out.append(
            {
                "loss": float(metrics["loss"]),
                "variables": _host({"params": state.params, "batch_stats": state.batch_stats}),
            }
        )
    return out


def _run_torch_train(name, original, batches) -> list[dict]:
    model = torch_models.create_model(name, num_classes=NUM_CLASSES)
    convert.flax_to_torch(original, model)
    model.train()
    optimizer = torch_train.make_optimizer(model, lr=TRAIN_LR, weight_decay=1e-4)
    out = []
    for b in batches:
        loss = torch_train.train_step(
            model, optimizer, _nchw(b["image"]), torch.from_numpy(b["label"]).long()
        )
        out.append({"loss": loss.item(), "variables": _torch_variables(model, original)})
    return out


def _mismatches(jax_vars: dict, torch_vars: dict) -> list[str]:
    """Paths whose arrays differ beyond rtol/atol, with the worst absolute difference."""
    bad = []
    for collection in ("params", "batch_stats"):
        a = traverse_util.flatten_dict(jax_vars[collection]) if jax_vars[collection] else {}
        b = traverse_util.flatten_dict(torch_vars[collection]) if torch_vars[collection] else {}
        assert a.keys() == b.keys(), f"{collection}: different leaves"
        for path in sorted(a):
            x, y = a[path], b[path]
            if not np.allclose(x, y, rtol=RTOL, atol=ATOL):
                worst = float(np.max(np.abs(x - y)))
                bad.append(f"{collection}/{'/'.join(path)} (max |diff| {worst:.3g})")
    return bad


def _assert_loss_close(jax_value: float, torch_value: float, what: str) -> None:
    np.testing.assert_allclose(jax_value, torch_value, rtol=LOSS_RTOL, atol=1e-7, err_msg=what)


# ----------------------------------------------------------------------------- trajectories


@functools.lru_cache(maxsize=None)
def _camu_trajectories(config: str, coefficients=steps.CamuCoefficients()):
    name, shape, batch_size, sizes = CONFIGS[config]
    original = _original_variables(name, shape)
    batches = _camu_batches(1, sizes, shape)
    jax_out = _run_jax_camu(name, original, batches, batch_size, coefficients)
    torch_out = _run_torch_camu(name, original, batches, torch_camu.Coefficients())
    return original, jax_out, torch_out


@functools.lru_cache(maxsize=None)
def _train_trajectories(config: str):
    name, shape, batch_size, sizes = CONFIGS[config]
    original = _original_variables(name, shape, seed=3)
    batches = _train_batches(2, sizes, shape)
    return _run_jax_train(name, original, batches, batch_size), _run_torch_train(
        name, original, batches
    )


# ----------------------------------------------------------------------------- tests


def test_convert_round_trip_cnn():
    original = _original_variables("cnn", (28, 28, 1))
    module = torch_models.CNN()
    convert.flax_to_torch(original, module)
    back = _host(convert.torch_to_flax(module, original))
    assert back["batch_stats"] == {}
    assert not _mismatches(_host(original), back)
    np.testing.assert_array_equal(
        module.fc1.weight.detach().numpy(), np.asarray(original["params"]["fc1"]["kernel"]).T
    )


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_convert_round_trip_resnet(stem):
    name = "resnet18_cifar" if stem == "cifar" else "resnet18"
    original = _original_variables(name, (32, 32, 3))
    for module in (
        torch_models.ReferenceResNet(NUM_CLASSES, stem=stem),
        torch_models.resnet18(NUM_CLASSES, stem=stem),  # torchvision layout
    ):
        convert.flax_to_torch(original, module)
        back = _host(convert.torch_to_flax(module, original))
        for collection in ("params", "batch_stats"):
            jax.tree.map(
                np.testing.assert_array_equal, _host(original)[collection], back[collection]
            )
        # And from a state_dict too.
        back = _host(convert.torch_to_flax(module.state_dict(), original))
        assert not _mismatches(_host(original), back)


def test_convert_rejects_wrong_shapes():
    original = _original_variables("cnn", (28, 28, 1))
    with pytest.raises(ValueError, match="fc2"):
        convert.flax_to_torch(original, torch_models.CNN(num_classes=7))


@pytest.mark.parametrize("config", ["cnn", "resnet18_cifar"])
@pytest.mark.parametrize("after", [1, 10])
def test_camu_step_parity(config, after):
    _, jax_out, torch_out = _camu_trajectories(config)
    j, t = jax_out[after - 1], torch_out[after - 1]
    _assert_loss_close(j["loss_rep"], t["loss_rep"], f"L_rep after {after}")
    _assert_loss_close(j["loss_out"], t["loss_out"], f"L_out after {after}")
    assert not _mismatches(j["variables"], t["variables"])


@pytest.mark.parametrize("config", ["cnn", "resnet18_cifar"])
def test_camu_step_parity_partial_last_batch(config):
    """Step 11 is short (20 of 32 / 5 of 8): JAX pads with mask zeros, PyTorch gets it short."""
    _, jax_out, torch_out = _camu_trajectories(config)
    j, t = jax_out[-1], torch_out[-1]
    _assert_loss_close(j["loss_rep"], t["loss_rep"], "L_rep, short batch")
    _assert_loss_close(j["loss_out"], t["loss_out"], "L_out, short batch")
    assert not _mismatches(j["variables"], t["variables"])


def test_camu_step_parity_resnet_imagenet_stem():
    _, jax_out, torch_out = _camu_trajectories("resnet18_imagenet")
    j, t = jax_out[0], torch_out[0]
    _assert_loss_close(j["loss_rep"], t["loss_rep"], "L_rep")
    _assert_loss_close(j["loss_out"], t["loss_out"], "L_out")
    assert not _mismatches(j["variables"], t["variables"])


def test_parity_check_detects_a_changed_coefficient():
    """The comparison has teeth: out_forget 0.02 instead of 0.01 on the JAX side must fail it."""
    name, shape, batch_size, sizes = CONFIGS["cnn"]
    original, _, torch_out = _camu_trajectories("cnn")
    batches = _camu_batches(1, sizes[:1], shape)
    changed = steps.CamuCoefficients(out_forget=0.02)
    j = _run_jax_camu(name, original, batches, batch_size, changed)[0]
    t = torch_out[0]
    _assert_loss_close(j["loss_rep"], t["loss_rep"], "L_rep is computed before the change")
    with pytest.raises(AssertionError):
        _assert_loss_close(j["loss_out"], t["loss_out"], "L_out")
    assert _mismatches(j["variables"], t["variables"])


@pytest.mark.parametrize("config", ["cnn", "resnet18_cifar"])
@pytest.mark.parametrize("after", [1, 10, 11])
def test_train_step_parity(config, after):
    """Original training (Adam 1e-3, coupled weight decay 1e-4, CE); step 11 is short."""
    jax_out, torch_out = _train_trajectories(config)
    j, t = jax_out[after - 1], torch_out[after - 1]
    _assert_loss_close(j["loss"], t["loss"], f"loss at step {after}")
    assert not _mismatches(j["variables"], t["variables"])
