"""Flax NNX modules under the model contract: split once into a graph and its states, merged
inside every traced call (never `nnx.jit`, whose graph traversal costs Python time per call).

An NNX model is the module itself (`Net(rngs=nnx.Rngs(0))`), with the linen contract:
`__call__(x, *, train, mask) -> (logits, embedding)` and a `head_modules` class attribute
naming the top-level attributes after the embedding. Its variables, to camu_jax, are
`{'params': nnx.Param leaves, 'batch_stats': nnx.BatchStat leaves}` as pure nested dicts keyed
by attribute names, so a head named `'head'` is `params['head']`, as for linen. Its other state
(the `nnx.Rngs` streams of its dropout layers, other variables) is read from the module; the
RNG streams get a fresh key per member and step in train mode
(`camu_jax.models.randomness`), and the module's own keys in eval mode, where
deterministic layers draw none.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from camu_jax.models.randomness import stream_rngs


def is_nnx(model) -> bool:
    """Whether `model` is a Flax NNX module."""
    return isinstance(model, nnx.Module)


@dataclasses.dataclass(frozen=True, eq=False)
class Parts:
    graphdef: nnx.GraphDef
    params: nnx.State
    batch_stats: nnx.State
    rest: nnx.State
    streams: tuple[str, ...]  # the tags of the module's RNG streams


@functools.lru_cache(maxsize=32)
def parts(model: nnx.Module) -> Parts:
    """The module split once (cached per module object)."""
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    tags = {v.tag for _, v in nnx.to_flat_state(rest) if isinstance(v, nnx.RngKey)}
    return Parts(graphdef, params, batch_stats, rest, tuple(sorted(tags)))


def variables(model: nnx.Module) -> dict:
    """`{'params', 'batch_stats'}` of the module, as pure dicts of fresh arrays (a state built
    from them may be donated without deleting the module's own)."""
    p = parts(model)
    return {
        "params": jax.tree.map(jnp.array, nnx.to_pure_dict(p.params)),
        "batch_stats": jax.tree.map(jnp.array, nnx.to_pure_dict(p.batch_stats)),
    }


def streams(model: nnx.Module) -> tuple[str, ...]:
    return parts(model).streams


def stock_batchnorms(model: nnx.Module, ours: type) -> list[str]:
    """Paths of the `nnx.BatchNorm` modules in `model` (not `ours`, the project's)."""
    return [
        "/".join(map(str, path))
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.BatchNorm) and not isinstance(node, ours)
    ]


def _filled(template: nnx.State, pure: dict) -> nnx.State:
    # A copy made in the current trace (merging the template's own variables would mutate
    # them from another trace level), then the values of `pure`.
    state = jax.tree.map(lambda v: v, template)
    nnx.replace_by_pure_dict(state, pure)
    return state


def apply(model, params, batch_stats, x, *, train: bool, mask, key=None):
    """`(output, batch_stats)` of one call; `key`: the step's key (train mode, a model with RNG
    streams), from which every stream of every layer gets its own."""
    p = parts(model)
    rest = jax.tree.map(lambda v: v, p.rest)
    if key is not None:
        keys = stream_rngs(key, p.streams)
        for i, (_, var) in enumerate(nnx.to_flat_state(rest)):
            if isinstance(var, nnx.RngKey):
                var.set_value(jax.random.fold_in(keys[var.tag], i))
            elif isinstance(var, nnx.RngCount):
                var.set_value(jnp.zeros_like(var.get_value()))
    module = nnx.merge(
        p.graphdef, _filled(p.params, params), _filled(p.batch_stats, batch_stats), rest
    )
    # What `model.train()` / `model.eval()` set (dropout's `deterministic`, BatchNorm's
    # `use_running_average`), for layers that read them rather than `train`.
    if train:
        module.train()
    else:
        module.eval()
    out = module(x, train=train, mask=mask)
    if train and batch_stats:
        batch_stats = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))
    return out, batch_stats
