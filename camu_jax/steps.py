"""Supervised training's pure pieces: the optimizer, the state and the un-jitted step of the
original and retrained models, and the checks and metric helpers the other steps share.

A step is `(state, batch) -> (state, metrics)`; model and optimizer are bound with
`functools.partial` and the caller jits (with `donate_argnums=0`). Batches hold preprocessed
float inputs `[batch, H, W, C]` and a 0/1 `mask` `[batch]` marking real examples. CaMU's
double step and state live with the method, in `camu_jax.methods.camu`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

from camu_jax import losses
from camu_jax.models import apply_model

PyTree = Any


def adam_l2(learning_rate: float, weight_decay: float = 1e-4) -> optax.GradientTransformation:
    """PyTorch `Adam(lr, weight_decay)`: *coupled* L2 (added to the gradient before the
    moments), not AdamW."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.scale(-learning_rate),
    )


def cast_like(value, leaf) -> jax.Array:
    """`value` (a Python number or a scalar array: a member's data setting, perhaps traced) as
    a scalar of `leaf`'s dtype: what a Python float constant becomes in arithmetic with `leaf`
    (JAX's weak typing), so a setting passed as data computes what the constant computed."""
    return jnp.asarray(value, jnp.result_type(leaf))


def _add_decayed_weights(weight_decay) -> optax.GradientTransformation:
    """`optax.add_decayed_weights` (`g + wd * p`, skipped for a Python zero) with `wd` cast to
    each leaf's dtype; its state, `optax.EmptyState`, does not depend on `wd`."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs the params: call update(updates, state, params)")
        if isinstance(weight_decay, int | float) and weight_decay == 0.0:
            return updates, state
        return jax.tree.map(lambda g, p: g + cast_like(weight_decay, g) * p, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _scale(step_size) -> optax.GradientTransformation:
    """`optax.scale` with the factor cast to each leaf's dtype (state `optax.EmptyState`)."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda g: cast_like(step_size, g) * g, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def adam_l2_traced(learning_rate, weight_decay) -> optax.GradientTransformation:
    """`adam_l2` for hyperparameters that may be traced arrays (a member's data settings,
    `camu_jax.methods.base.settings`): the same updates as `adam_l2` with those values as
    Python floats (each cast to the dtype of the leaf it scales, as a float constant is), and
    the same optimizer state, whose structure does not depend on the values: a state from
    `adam_l2(...).init` or from this one's `init` with any values serves every value."""
    return optax.chain(
        _add_decayed_weights(weight_decay),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        _scale(-learning_rate),
    )


def sgd_traced(learning_rate, momentum, weight_decay=0.0) -> optax.GradientTransformation:
    """PyTorch `SGD(lr, momentum, weight_decay)` (coupled L2, then heavy-ball momentum) for
    hyperparameters that may be traced arrays: the momentum trace is always kept (its state,
    like the params, does not depend on the values), so a momentum of 0 computes
    `g + 0 * trace = g`, what SGD without momentum computes. Each value is cast to the dtype of
    the leaf it scales, as a Python float constant is."""

    def trace_update(updates, state, params=None):
        trace = jax.tree.map(lambda g, t: g + cast_like(momentum, t) * t, updates, state.trace)
        return trace, optax.TraceState(trace=trace)

    return optax.chain(
        _add_decayed_weights(weight_decay),
        optax.GradientTransformation(
            lambda params: optax.TraceState(trace=jax.tree.map(jnp.zeros_like, params)),
            trace_update,
        ),
        _scale(-learning_rate),
    )


class TrainState(struct.PyTreeNode):
    """State of ordinary supervised training (the original and the retrained model)."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState


def check_number(name: str, value, *, integer: bool = False, positive: bool = True) -> None:
    """Raises ValueError naming `value` unless it is a finite number (an integer if `integer`),
    > 0 if `positive`, else >= 0. Booleans are refused: `True` as an epoch count is a bug."""
    kind = numbers.Integral if integer else numbers.Real
    ok = (
        isinstance(value, kind)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > 0 if positive else value >= 0)
    )
    if not ok:
        sign = "a positive" if positive else "a non-negative"
        raise ValueError(
            f"{name} must be {sign} {'integer' if integer else 'finite number'}, got {value!r}"
        )


def init_train_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
    )


def with_finite(metrics: dict) -> dict:
    """`metrics` (scalars) with `finite`: whether every one of them is finite (the engine's
    divergence check reads it)."""
    metrics["finite"] = jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()]))
    return metrics


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
) -> tuple[TrainState, dict]:
    """One cross-entropy step. batch: `image [b,H,W,C]`, `label [b]`, `mask [b]`."""

    def loss_fn(params):
        logits, _, batch_stats = apply_model(
            model, params, state.batch_stats, batch["image"], train=True, mask=batch["mask"]
        )
        loss = losses.cross_entropy_mean(
            logits=logits, labels=batch["label"], weights=batch["mask"]
        )
        return loss, batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, with_finite({"loss": loss})
