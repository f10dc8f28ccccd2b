"""The models' calling convention: how camu_jax initialises and runs any Flax model.

A model is a linen module with `__call__(x, *, train, mask) -> (logits, embedding)` and a
`head_modules` attribute (the README's "Your own model and data"); `init_variables` and
`apply_model` check the contract and name what is missing.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

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


def check_model(model: nn.Module) -> None:
    """Raises TypeError, saying what is missing, unless `model.__call__` accepts the keyword
    arguments `train` and `mask` (the outputs are checked when the model first runs)."""
    _check_signature(type(model))


def apply_model(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    x: jax.Array,
    *,
    train: bool,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, PyTree]:
    """Forward pass -> `(logits, embedding, batch_stats)`; train mode updates BatchNorm stats.

    `model` follows the contract in `camu_jax.models`; a model that does not is refused with a
    TypeError saying what is missing.
    """
    check_model(model)
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
        if train:
            out, updates = model.apply(variables, x, train=True, mask=mask, mutable=["batch_stats"])
            return *_check_outputs(model, out), updates["batch_stats"]
    logits, emb = _check_outputs(model, model.apply(variables, x, train=train, mask=mask))
    return logits, emb, batch_stats


def init_variables(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> dict:
    """`{'params', 'batch_stats'}` for inputs `[batch, *input_shape]` (batch_stats may be {}),
    from `key`: a `jax.random.key` or its key data (`uint32[2]`, e.g. `camu_jax.keys.key_data`).

    Checks that `model` follows the contract in `camu_jax.models` (TypeError otherwise).
    """
    check_model(model)
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
        out, variables = model.init_with_output(jax.random.wrap_key_data(key_data), x, train=False)
        _check_outputs(model, out)
        return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

    return jax.jit(init)
