"""The contract for a user's own model and images (`camu_jax.models`, `preprocess`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from camu_jax import models, steps
from camu_jax.data.pipeline import InputSpec, preprocess
from camu_jax.methods import camu

SHAPE = (6, 6, 1)
X = np.zeros((4, *SHAPE), np.float32)
TX = steps.adam_l2(1e-3)


class LogitsOnly(nn.Module):
    """What a plain classifier looks like: no `train`/`mask`, logits only."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class NoEmbedding(nn.Module):
    """Takes the keywords but still returns logits only."""

    head_modules = ()

    @nn.compact
    def __call__(self, x, *, train=False, mask=None):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class Good(nn.Module):
    head_modules = ("head",)

    @nn.compact
    def __call__(self, x, *, train=False, mask=None):
        emb = nn.Dense(8, name="body")(x.reshape(x.shape[0], -1))
        return nn.Dense(3, name="head")(emb), emb


class NoHeads(Good):
    head_modules = None


class WrongHeads(Good):
    head_modules = ("fc",)


CONTRACT = (
    r"camu_jax calls a model as `model\.apply\(variables, x, train=\.\.\., mask=\.\.\.\)` "
    r"and needs `\(logits \[batch, classes\], embedding \[batch, \.\.\.\]\)` back"
)


def test_logits_only_model_is_refused_naming_the_contract():
    with pytest.raises(TypeError, match=r"LogitsOnly.__call__ takes no keyword argument 'train' "
                       r"or 'mask': " + CONTRACT):  # fmt: skip
        models.init_variables(LogitsOnly(), jax.random.key(0), SHAPE)
    # Initialised by hand, it is refused where the steps run it too (not deep inside Flax).
    variables = {"params": LogitsOnly().init(jax.random.key(0), X)["params"], "batch_stats": {}}
    state = steps.init_train_state(variables, TX)
    batch = {"image": X, "label": np.zeros(4, np.int32), "mask": np.ones(4, np.float32)}
    with pytest.raises(TypeError, match="takes no keyword argument 'train' or 'mask'"):
        steps.train_step(state, batch, model=LogitsOnly(), tx=TX)


def test_model_without_embedding_is_refused():
    with pytest.raises(
        TypeError, match=r"NoEmbedding returned one array of shape \(1, 3\), not \(logits, emb"
    ):
        models.init_variables(NoEmbedding(), jax.random.key(0), SHAPE)


def _camu_step(model):
    variables = models.init_variables(Good(), jax.random.key(0), SHAPE)
    state = camu.init_camu_state(variables, TX, TX)
    batch = {
        "x_f": X, "x_s": X, "y_s": np.zeros(4, np.int32), "y_cf": np.ones(4, np.int32),
        "z0_s": np.zeros((4, 8), np.float32), "z0_cf": np.zeros((4, 8), np.float32),
        "mask_f": np.ones(4, np.float32), "mask_s": np.ones(4, np.float32),
    }  # fmt: skip
    return camu.camu_step(state, batch, model=model, kl_tx=TX, ce_tx=TX)


def test_head_modules_are_required_and_checked():
    with pytest.raises(TypeError, match=r"NoHeads has no `head_modules` attribute"):
        _camu_step(NoHeads())
    with pytest.raises(ValueError, match=r"names \['fc'\], which are not top-level parameter"):
        _camu_step(WrongHeads())
    state, metrics = _camu_step(Good())
    assert bool(metrics["finite"])


@pytest.mark.parametrize("jitted", [False, True])
def test_float_images_are_taken_as_scaled(jitted):
    rng = np.random.default_rng(0)
    floats = rng.uniform(0.0, 1.0, (2, *SHAPE)).astype(np.float32)
    floats[0, 0, 0, 0] = 1.0
    run = jax.jit(preprocess, static_argnums=1) if jitted else preprocess
    np.testing.assert_array_equal(run(floats, InputSpec()), floats)  # Not divided by 255.
    spec = InputSpec(mean=(0.5,), std=(0.25,))
    # Normalisation still applies: at most one rounding of (x - 0.5) / 0.25 apart.
    np.testing.assert_allclose(
        run(floats, spec), (floats - 0.5) / 0.25, rtol=0, atol=4 * np.finfo(np.float32).eps
    )
    pixels = np.array([[0, 255]], np.uint8).reshape(1, 1, 2, 1)
    np.testing.assert_array_equal(run(pixels, InputSpec()).ravel(), [0.0, 1.0])


def test_integer_images_other_than_uint8_are_refused():
    with pytest.raises(TypeError, match="images of dtype int32: expected uint8"):
        preprocess(jnp.zeros((1, *SHAPE), jnp.int32), InputSpec())


def test_library_models_declare_their_heads():
    from camu_jax.models import create_model, head_modules

    for name, heads in {"cnn": ("fc2", "fc3"), "resnet18": ("fc",)}.items():
        model = create_model(name, num_classes=3)
        assert head_modules(model) == heads
        params = jax.eval_shape(
            functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 32, 32, 1))
        )["params"]
        assert set(heads) <= set(params)
