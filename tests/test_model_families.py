"""The model contract widened (issue 19, item 1): linen models with dropout, Flax NNX modules
(BatchNorm and dropout), tabular `[N, D]` inputs and stock BatchNorm, each through `compare`
with CaMU and two baselines, and the pieces underneath (per-member, per-step dropout keys;
CaMU's step A leaving the head alone)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from sklearn.datasets import load_digits

from camu_jax import DeviceData, ForgetSpec, TrainConfig, compare, engine, make_splits, models
from camu_jax.data.pipeline import InputSpec
from camu_jax.methods import camu
from camu_jax.models import randomness
from camu_jax.steps import adam_l2
from camu_jax.training import train_program

TINY = TrainConfig(epochs=2, batch_size=32, learning_rate=1e-2)
METHODS = ("camu", "ft", "rl")


class DropoutMLP(nn.Module):
    """A linen MLP with dropout (the stream `'dropout'`) in train mode only."""

    rate: float = 0.5
    head_modules = ("head",)

    @nn.compact
    def __call__(self, x, *, train=False, mask=None):
        h = nn.relu(nn.Dense(32, name="body")(x.reshape(x.shape[0], -1)))
        z = nn.Dropout(self.rate, deterministic=not train)(h)
        return nn.Dense(10, name="head")(z), z


class NnxCNN(nnx.Module):
    """An NNX CNN with the project's NNX BatchNorm and dropout."""

    head_modules = ("head",)

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(channels, 8, kernel_size=(3, 3), rngs=rngs)
        self.bn = models.NnxBatchNorm(8)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.body = nnx.Linear(8 * 4 * 4, 32, rngs=rngs)
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x, *, train=False, mask=None):
        h = nnx.relu(self.bn(self.conv(x), train=train, mask=mask))
        h = nnx.max_pool(h, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
        z = self.body(self.drop(h, deterministic=not train))
        return self.head(nnx.relu(z)), z


class StockBN(nn.Module):
    head_modules = ("head",)

    @nn.compact
    def __call__(self, x, *, train=False, mask=None):
        h = nn.BatchNorm(use_running_average=not train, name="norm")(nn.Dense(16)(x))
        return nn.Dense(3, name="head")(h), h


@functools.cache
def digits():
    d = load_digits()
    x, y = (d.images[..., None] / 16).astype(np.float32), d.target
    return x[:480], y[:480], x[1400:1520], y[1400:1520]


def tabular():
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 2.0, (10, 12))
    y = np.arange(600) % 10
    x = (centres[y] + rng.normal(0.0, 1.0, (600, 12))).astype(np.float32)
    return x[:480], y[:480], x[480:], y[480:]


def _compare(model, arrays):
    x, y, tx, ty = arrays
    train, test = DeviceData.put(x, y), DeviceData.put(tx, ty)
    splits = [make_splits(y, ForgetSpec(classes=(3,)), seed=0, num_classes=10)]
    return compare(
        model,
        train=train,
        test=test,
        splits=splits,
        seeds=[0],
        methods=METHODS,
        train_config=TINY,
        eval_workers=1,
    )


FAMILIES = {
    "linen_cnn": (lambda: models.create_model("cnn", num_classes=10), digits),
    "linen_mlp_dropout": (DropoutMLP, digits),
    "nnx_cnn_batchnorm": (lambda: NnxCNN(1, rngs=nnx.Rngs(0)), digits),
    "tabular_mlp": (DropoutMLP, tabular),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_runs_through_compare(family):
    make_model, data = FAMILIES[family]
    runs = _compare(make_model(), data())
    rows = runs[0]["methods"]
    assert set(rows) == {"original", "retrain", *METHODS}
    for name, metrics in rows.items():
        assert "diverged" not in metrics, (name, metrics)
        for k, v in metrics.items():
            if isinstance(v, float):
                assert np.isfinite(v), (name, k, v)
    # The original learned something in two epochs (no stock BatchNorm stuck at its init).
    assert rows["original"]["test_acc"] > 30.0, rows["original"]
    for name, variables in getattr(runs, "models", {}).items():
        for leaf in jax.tree.leaves(variables[0]):
            assert np.isfinite(np.asarray(leaf)).all(), name


def _camu_batch(x, z):
    n = len(x)
    return {
        "x_f": x, "x_s": x[::-1], "y_s": np.zeros(n, np.int32), "y_cf": np.ones(n, np.int32),
        "z0_s": z, "z0_cf": z + 1.0,
        "mask_f": np.ones(n, np.float32), "mask_s": np.ones(n, np.float32),
    }  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_camu_step_a_leaves_the_head_alone(family):
    make_model, data = FAMILIES[family]
    model = make_model()
    x = data()[0][:8]
    variables = models.init_variables(model, jax.random.key(0), x.shape[1:])
    heads = models.head_modules(model)
    assert heads and set(heads) <= set(variables["params"])
    kl_tx, frozen = adam_l2(1e-2), optax.set_to_zero()  # step B moves nothing
    state = camu.init_camu_state(variables, kl_tx, frozen)
    _, emb, _ = models.apply_model(
        model, variables["params"], variables["batch_stats"], x, train=False
    )
    batch = _camu_batch(x, np.asarray(emb))
    step = functools.partial(camu.camu_step, model=model, kl_tx=kl_tx, ce_tx=frozen)
    with models.step_rngs(jax.random.key(1)):  # read when traced
        new, metrics = jax.jit(step)(state, batch)
    assert bool(metrics["finite"])
    for name, before in variables["params"].items():
        after = new.params[name]
        same = all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
        )
        assert same == (name in heads), name


def _outputs(model, variables, x, key):
    with models.step_rngs(key):
        return models.apply_model(
            model, variables["params"], variables["batch_stats"], x, train=True
        )[0]


@pytest.mark.parametrize("make_model", [DropoutMLP, lambda: NnxCNN(1, rngs=nnx.Rngs(0))])
def test_dropout_keys_differ_by_member_and_step_and_repeat(make_model):
    model = make_model()
    x = digits()[0][:16]
    variables = models.init_variables(model, jax.random.key(0), x.shape[1:])
    member = [randomness.member_step_key(jnp.asarray([0, m], jnp.uint32), 0) for m in (1, 2)]
    later = randomness.member_step_key(jnp.asarray([0, 1], jnp.uint32), 1)
    a, b, c = (np.asarray(_outputs(model, variables, x, k)) for k in (*member, later))
    assert not np.array_equal(a, b)  # members
    assert not np.array_equal(a, c)  # steps
    np.testing.assert_array_equal(a, _outputs(model, variables, x, member[0]))  # repeatable
    # Evaluation needs no key and draws nothing.
    e1, e2 = (
        models.apply_model(model, variables["params"], variables["batch_stats"], x, train=False)[0]
        for _ in range(2)
    )
    np.testing.assert_array_equal(e1, e2)


def _two_members(model, keys):
    """Two members of one training population, identical but for their keys: params after
    two steps of the same batches."""
    x, y = digits()[:2]
    data = DeviceData.put(x[:64], y[:64])
    variables = models.init_variables(model, jax.random.key(0), x.shape[1:])
    tx = adam_l2(1e-2)
    eng = engine.Engine(train_program(model, tx, InputSpec(), data.mesh), data.mesh)
    state = eng.init(engine.stack([variables, variables]))
    member = {"items": np.stack([np.arange(64, dtype=np.int32)] * 2), "key": np.stack(keys)}
    ids = np.arange(64, dtype=np.int32).reshape(2, 32)
    plan = {"ids": np.stack([ids, ids]), "mask": np.ones((2, 2, 32), np.float32)}
    state, _ = eng(state, (data.images, data.labels), member, plan)
    return [jax.tree.map(lambda p, i=i: np.asarray(p)[i], state.params) for i in range(2)]


def test_members_with_different_keys_get_different_dropout_updates():
    keys = [np.asarray([0, 1], np.uint32), np.asarray([0, 2], np.uint32)]
    a, b = _two_members(DropoutMLP(), keys)
    assert not np.array_equal(a["body"]["kernel"], b["body"]["kernel"])
    # Without dropout the two keys change nothing: the difference is dropout's.
    a, b = _two_members(DropoutMLP(rate=0.0), keys)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_stock_batchnorm_is_named_and_the_replacement_told():
    with pytest.warns(models.StockBatchNormWarning, match=r"StockBN uses flax's stock BatchNorm "
                      r"at norm: .*camu_jax\.models\.BatchNorm"):  # fmt: skip
        models.init_variables(StockBN(), jax.random.key(0), (5,))


def test_nnx_model_is_refused_in_plain_words():
    class Plain(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc(x)

    with pytest.raises(TypeError, match="Plain.__call__ takes no keyword argument 'train'"):
        models.init_variables(Plain(nnx.Rngs(0)), jax.random.key(0), (4,))
    with pytest.raises(TypeError, match="a class, not an instance"):
        models.init_variables(NnxCNN, jax.random.key(0), (8, 8, 1))


def test_linen_model_random_in_eval_mode_is_refused_in_plain_words():
    class AlwaysDrops(DropoutMLP):
        @nn.compact
        def __call__(self, x, *, train=False, mask=None):
            z = nn.Dropout(0.5, deterministic=False)(nn.Dense(8, name="body")(x))
            return nn.Dense(3, name="head")(z), z

    with pytest.raises(TypeError, match=r"asks for random numbers with train=False"):
        models.init_variables(AlwaysDrops(), jax.random.key(0), (4,))


def test_train_mode_outside_a_step_asks_for_a_key():
    model = DropoutMLP()
    variables = models.init_variables(model, jax.random.key(0), (12,))
    with pytest.raises(TypeError, match=r"streams dropout\) in train mode, and no key"):
        models.apply_model(model, variables["params"], {}, jnp.ones((2, 12)), train=True)


def test_nnx_head_is_named_through_to_linen():
    module = nnx.bridge.to_linen(NnxCNN, 1)
    assert models.head_modules(module) == ("head",)


def test_uint8_images_need_a_channel_axis_but_floats_take_any_rank():
    with pytest.raises(ValueError, match=r"\[N, H, W, C\].*uint8 arrays are read as pixels"):
        DeviceData.put(np.zeros((4, 8, 8), np.uint8), np.arange(4))
    for shape in [(4, 12), (4, 5, 12)]:
        assert DeviceData.put(np.zeros(shape, np.float32), np.arange(4)).input_shape == shape[1:]
    with pytest.raises(ValueError, match=r"resize and augment .* images only"):
        DeviceData.put(np.zeros((4, 12), np.float32), np.arange(4), spec=InputSpec(augment=True))
