"""The models' calling convention: how camu_jax initialises and runs any Flax model.

A model is a linen or NNX module with `__call__(x, *, train, mask) -> (logits, embedding)` and
a `head_modules` attribute (the README's "Your own model and data"); `init_variables` and
`apply_model` check the contract and name what is missing. A model with stochastic layers gets
a key for each of its RNG streams in train mode (`camu_jax.models.randomness`); one with a
stock `nn.BatchNorm` / `nnx.BatchNorm` is warned about (`StockBatchNormWarning`).
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings
from typing import Any

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from camu_jax.models import nnx_models, randomness

PyTree = Any


_CONTRACT = (
    "camu_jax calls a model as `model.apply(variables, x, train=..., mask=...)` and needs "
    "`(logits [batch, classes], embedding [batch, ...])` back; see the README, 'Your own model "
    "and data'"
)


@functools.lru_cache(maxsize=64)
def _check_signature(cls: type) -> None:
    params = inspect.signature(cls.__call__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    names = {p.name for p in params if p.kind is not p.POSITIONAL_ONLY}
    missing = [k for k in ("train", "mask") if k not in names]
    if missing:
        raise TypeError(
            f"{cls.__name__}.__call__ takes no keyword argument {' or '.join(map(repr, missing))}"
            f": {_CONTRACT}"
        )


def _check_outputs(model: nn.Module, out) -> tuple[jax.Array, jax.Array]:
    if not (isinstance(out, tuple | list) and len(out) == 2):
        if isinstance(out, tuple | list):
            what = f"a tuple of {len(out)}"
        else:
            what = f"one array of shape {out.shape}" if hasattr(out, "shape") else repr(out)
        raise TypeError(
            f"{type(model).__name__} returned {what}, not (logits, embedding): {_CONTRACT}"
        )
    logits, emb = out
    if jnp.ndim(logits) != 2 or jnp.ndim(emb) < 2 or emb.shape[0] != logits.shape[0]:
        raise TypeError(
            f"{type(model).__name__} returned logits of shape {jnp.shape(logits)} and an "
            f"embedding of shape {jnp.shape(emb)}: {_CONTRACT}"
        )
    return logits, emb


def check_model(model) -> None:
    """Raises TypeError, saying what is missing, unless `model` is a linen or NNX module whose
    `__call__` accepts the keyword arguments `train` and `mask` (the outputs are checked when
    the model first runs)."""
    if not isinstance(model, nn.Module | nnx_models.nnx.Module):
        what = "a class, not an instance" if isinstance(model, type) else type(model).__name__
        raise TypeError(
            f"the model is {what}: camu_jax takes a Flax linen module (`Net()`) or a Flax NNX "
            f"module (`Net(rngs=nnx.Rngs(0))`); {_CONTRACT}"
        )
    _check_signature(type(model))


class StockBatchNormWarning(UserWarning):
    """A model uses Flax's own BatchNorm, whose semantics differ from what camu_jax assumes."""


_BATCHNORM_ADVICE = (
    "Flax's BatchNorm (momentum 0.99, no `mask`) keeps running averages that barely move on a "
    "short run, and counts the padded rows of every short last batch, so a model evaluated "
    "after a few epochs scores far below what it learned; use the project's BatchNorm "
    "(PyTorch's semantics, momentum 0.1, masked): `camu_jax.models.BatchNorm(name=...)(x, "
    "train=train, mask=mask)` in linen, `camu_jax.models.NnxBatchNorm(features)` called as "
    "`bn(x, train=train, mask=mask)` in NNX"
)


def stock_batchnorms(model, input_shape: tuple[int, ...]) -> list[str]:
    """Paths of the modules of `model` that are Flax's own BatchNorm (`nn.BatchNorm` in linen,
    `nnx.BatchNorm` in NNX); a linen model is traced (not run) on `[1, *input_shape]`."""
    return list(_model_facts(model, tuple(input_shape))[1])


@functools.lru_cache(maxsize=64)
def _model_facts(model, input_shape: tuple[int, ...]) -> tuple[tuple, tuple[str, ...]]:
    """`(output shapes, stock BatchNorm paths)` of `model` on `[1, *input_shape]`, traced once
    per model and shape; warns once about stock BatchNorms."""
    from camu_jax.models.layers import BatchNorm as Ours
    from camu_jax.models.nnx_layers import BatchNorm as NnxOurs

    check_model(model)
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    if nnx_models.is_nnx(model):
        v = nnx_models.variables(model)
        out = jax.eval_shape(
            lambda x: _call(model, v["params"], v["batch_stats"], x, train=False, mask=None)[0], x
        )
        stock = nnx_models.stock_batchnorms(model, NnxOurs)
    else:
        found = []

        def spy(next_fun, args, kwargs, context):
            m = context.module
            if isinstance(m, nn.BatchNorm) and not isinstance(m, Ours):
                path = "/".join(m.scope.path) if m.scope is not None else type(m).__name__
                if path not in found:
                    found.append(path)
            return next_fun(*args, **kwargs)

        def init(x):
            with nn.intercept_methods(spy):
                _, variables = _linen_init(model, jax.random.key(0), x)
            # Init falls back on the 'params' key for any stream; evaluation has none.
            bs = variables.get("batch_stats", {})
            return _call(model, variables["params"], bs, x, train=False, mask=None)[0]

        out = jax.eval_shape(init, x)
        stock = found
    logits, emb = _check_outputs(model, out)
    if stock:
        warnings.warn(
            f"{type(model).__name__} uses flax's stock BatchNorm at {', '.join(stock)}: "
            + _BATCHNORM_ADVICE,
            StockBatchNormWarning,
            stacklevel=4,
        )
    return (tuple(logits.shape), tuple(emb.shape)), tuple(stock)


def output_shapes(model, input_shape: tuple[int, ...]) -> tuple[tuple, tuple]:
    """`(logits shape, embedding shape)` of `model` on one input of `input_shape` (traced,
    not run; checks the contract and warns about stock BatchNorms once per model)."""
    return _model_facts(model, tuple(input_shape))[0]


def _linen_init(model: nn.Module, key: jax.Array, x: jax.Array):
    try:
        return model.init_with_output(key, x, train=False)
    except flax.errors.InvalidRngError as e:
        raise _eval_rng_error(model, e) from e


def _eval_rng_error(model, error: Exception) -> TypeError:
    return TypeError(
        f"{type(model).__name__} asks for random numbers with train=False ({error}): camu_jax "
        "initialises, evaluates and predicts with train=False and gives no rngs then; make "
        "its stochastic layers deterministic when `train` is False (e.g. "
        "`nn.Dropout(rate, deterministic=not train)`)"
    )


_STREAM = re.compile(r'needs PRNG for "([^"]+)"')


def rng_streams(model, params: PyTree, batch_stats: PyTree, x: jax.Array) -> tuple[str, ...]:
    """The RNG streams (`'dropout'`, ...) `model` draws from in train mode; `()` for a
    deterministic model. NNX: the tags of its `nnx.Rngs` streams; linen: found by tracing (not
    running) a train-mode call once per model and input shape."""
    if nnx_models.is_nnx(model):
        return nnx_models.streams(model)
    if (declared := getattr(model, "rng_streams", None)) is not None:
        return tuple(declared)
    spec = functools.partial(jax.tree.map, lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype))
    return _linen_streams(
        model, spec(params), spec(batch_stats), jax.ShapeDtypeStruct(x.shape, x.dtype)
    )


def _freeze(tree):
    return jax.tree_util.tree_structure(tree), tuple(jax.tree.leaves(tree))


@functools.lru_cache(maxsize=64)
def _linen_streams_cached(model, params_def, params_leaves, bs_def, bs_leaves, x):
    params = jax.tree_util.tree_unflatten(params_def, params_leaves)
    batch_stats = jax.tree_util.tree_unflatten(bs_def, bs_leaves)
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    found: list[str] = []
    while True:

        def run(variables, x, found=tuple(found)):
            key = jax.random.key(0)
            return model.apply(
                variables,
                x,
                train=True,
                mask=None,
                rngs={s: key for s in found},
                mutable=["batch_stats"],
            )

        try:
            jax.eval_shape(run, variables, x)
            return tuple(found)
        except flax.errors.InvalidRngError as e:
            m = _STREAM.search(str(e))
            if m is None or m.group(1) in found or m.group(1) == "params":
                raise TypeError(
                    f"{type(model).__name__} asks for random numbers in train mode ({e}) and "
                    "camu_jax could not tell the stream's name: declare the streams on the "
                    "class, e.g. `rng_streams = ('dropout',)`"
                ) from e
            found.append(m.group(1))


def _linen_streams(model, params, batch_stats, x) -> tuple[str, ...]:
    return _linen_streams_cached(model, *_freeze(params), *_freeze(batch_stats), x)


def _call(model, params, batch_stats, x, *, train: bool, mask, key=None):
    """`(output, batch_stats)` of one call of a linen or NNX model."""
    if nnx_models.is_nnx(model):
        return nnx_models.apply(model, params, batch_stats, x, train=train, mask=mask, key=key)
    variables = {"params": params}
    kwargs = {} if key is None else {"rngs": key}
    try:
        if batch_stats:
            variables["batch_stats"] = batch_stats
            if train:
                out, updates = model.apply(
                    variables, x, train=True, mask=mask, mutable=["batch_stats"], **kwargs
                )
                return out, updates["batch_stats"]
        return model.apply(variables, x, train=train, mask=mask, **kwargs), batch_stats
    except flax.errors.InvalidRngError as e:
        if train:
            raise
        raise _eval_rng_error(model, e) from e


def apply_model(
    model,
    params: PyTree,
    batch_stats: PyTree,
    x: jax.Array,
    *,
    train: bool,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, PyTree]:
    """Forward pass -> `(logits, embedding, batch_stats)`; train mode updates BatchNorm stats.

    `model` follows the contract in `camu_jax.models` (linen or NNX); a model that does not is
    refused with a TypeError saying what is missing. In train mode a model with RNG streams
    (dropout...) gets one key per stream, the next of the current step
    (`randomness.next_key`): inside the engine's steps, per member and step; elsewhere under
    `camu_jax.models.step_rngs(key)`. A model without them is called as it always was.
    """
    check_model(model)
    key = None
    if train and (streams := rng_streams(model, params, batch_stats, x)):
        step_key = randomness.next_key(
            f"{type(model).__name__} draws random numbers (streams {', '.join(streams)})"
        )
        # NNX folds a key per layer from the step's key; linen takes one per stream.
        key = step_key if nnx_models.is_nnx(model) else randomness.stream_rngs(step_key, streams)
    out, batch_stats = _call(model, params, batch_stats, x, train=train, mask=mask, key=key)
    logits, emb = _check_outputs(model, out)
    return logits, emb, batch_stats


def init_variables(model, key: jax.Array, input_shape: tuple[int, ...]) -> dict:
    """`{'params', 'batch_stats'}` for inputs `[batch, *input_shape]` (batch_stats may be {}),
    from `key`: a `jax.random.key` or its key data (`uint32[2]`, e.g. `camu_jax.keys.key_data`).

    A linen model is initialised from `key`; an NNX module is built initialised (its own
    `nnx.Rngs`), so its variables are its own, whatever the key (copies: the module is left
    alone). Checks that `model` follows the contract in `camu_jax.models` (TypeError
    otherwise) and warns about a stock BatchNorm (`StockBatchNormWarning`).
    """
    output_shapes(model, input_shape)
    if nnx_models.is_nnx(model):
        return nnx_models.variables(model)
    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        key = jax.random.key_data(key)  # key data in, wrapped inside: one program for both
    elif not isinstance(key, jax.Array):
        key = np.asarray(key, np.uint32)
    return _init_fn(model, tuple(input_shape))(key)


@functools.lru_cache(maxsize=32)
def _init_fn(model: nn.Module, input_shape: tuple[int, ...]):
    # One compiled program per model and shape: eagerly, every initializer of every layer
    # would compile on its own (seconds on an accelerator, for each new shape).
    def init(key_data):
        x = jnp.zeros((1, *input_shape), jnp.float32)
        out, variables = _linen_init(model, jax.random.wrap_key_data(key_data), x)
        _check_outputs(model, out)
        return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

    return jax.jit(init)
