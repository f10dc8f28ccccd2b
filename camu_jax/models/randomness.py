"""Per-member, per-step keys for a model's stochastic layers (dropout and the like).

A step of the engine (`camu_jax.engine`) runs inside `step_rngs`, with a key derived from the
member's own key and the state's step counter; every train-mode forward pass of a model that
asks for random numbers takes the next key of that step (`next_key`), and each of the model's
named streams (`'dropout'`, ...) gets its own key folded from it (`stream_rngs`). So members
differ (their keys differ), steps differ (the step counter), and two forward passes of one step
(CaMU's steps A and B) draw different masks, as two PyTorch forward passes do. A model without
such layers never reads any of this: its programs are those it had before.

Evaluation and prediction run with `train=False` and give no keys.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import zlib
from collections.abc import Callable

import jax

# Folded into the member's step key first, so that its stream of dropout keys is apart from
# the augmentation keys drawn from the same member key (`fold_in(key, step * 3 + stream)`).
RNG_TAG = 0x6D6F6465  # "mode"


@dataclasses.dataclass
class _Source:
    base: Callable[[], jax.Array]  # the step's key, computed where it is used (see next_key)
    calls: int = 0


_SOURCE: contextvars.ContextVar[_Source | None] = contextvars.ContextVar("step_rngs", default=None)


@contextlib.contextmanager
def step_rngs(key: jax.Array | Callable[[], jax.Array]):
    """Within this context (at trace time), train-mode forward passes of stochastic models draw
    their keys from `key`: a `jax.random.key`, its key data (`uint32[2]`), or a function of no
    arguments returning one (evaluated where a model needs it, so a deterministic model's
    program never computes it). The engine runs every step inside one; outside the engine,
    wrap a step that trains such a model in one yourself."""
    base = key if callable(key) else (lambda: key)
    token = _SOURCE.set(_Source(lambda: as_key(base())))
    try:
        yield
    finally:
        _SOURCE.reset(token)


def as_key(key: jax.Array) -> jax.Array:
    """A typed key from a `jax.random.key` or its key data."""
    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def member_step_key(key_data: jax.Array, step: jax.Array) -> jax.Array:
    """The key of a member's step: `fold_in(fold_in(member key, RNG_TAG), step)`."""
    return jax.random.fold_in(jax.random.fold_in(as_key(key_data), RNG_TAG), step)


def next_key(what: str) -> jax.Array:
    """The key of the next train-mode forward pass in the current `step_rngs` context; raises
    TypeError, naming `what` (the model and its streams), outside one."""
    source = _SOURCE.get()
    if source is None:
        raise TypeError(
            f"{what} in train mode, and no key is at hand: camu_jax gives them one per member "
            "and step inside its steps (the engine's `step_rngs`); to run a step of this model "
            "yourself, wrap it in `with camu_jax.models.step_rngs(key):`"
        )
    # Computed afresh at every use, not kept: a key made inside one `grad` trace must not
    # leak into the next forward pass's.
    key = jax.random.fold_in(source.base(), source.calls)
    source.calls += 1
    return key


def stream_rngs(key: jax.Array, streams: tuple[str, ...]) -> dict[str, jax.Array]:
    """`{stream: key}`: one key per named stream, folded from `key` by the stream's name (so a
    stream's keys do not depend on which other streams the model has)."""
    return {s: jax.random.fold_in(key, zlib.crc32(s.encode())) for s in streams}
