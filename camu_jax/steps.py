"""Pure, un-jitted steps: original training, the CaMU double step, evaluation.

Each step is `(state, batch) -> (state, metrics)`; model, optimizers and loss coefficients are
bound with `functools.partial` and the caller jits (with `donate_argnums=0`). Batches hold
preprocessed float inputs `[batch, H, W, C]` and a 0/1 `mask` `[batch]` marking real examples.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

from camu_jax import losses
from camu_jax.models import apply_model, head_modules

PyTree = Any


def adam_l2(learning_rate: float, weight_decay: float = 1e-4) -> optax.GradientTransformation:
    """PyTorch `Adam(lr, weight_decay)`: *coupled* L2 (added to the gradient before the
    moments), not AdamW."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.scale(-learning_rate),
    )


class TrainState(struct.PyTreeNode):
    """State of ordinary supervised training (the original and the retrained model)."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState


class CamuState(struct.PyTreeNode):
    """State of CaMU unlearning: one set of parameters, two optimizer states (step A, step B).

    The frozen original model is *not* part of it: it is a separate, never-donated argument.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    kl_opt_state: optax.OptState
    ce_opt_state: optax.OptState


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


@dataclasses.dataclass(frozen=True)
class CamuCoefficients:
    """Loss weights of the reference: L_rep = 0.5/0.5, L_out = 0.9 (D_s) / 0.01 (D_f, y_cf)."""

    rep_sample: float = 0.5  # step A (L_rep): weight of KL(z_0(x_s) || z(x_s)) on D_s
    rep_forget: float = 0.5  # step A (L_rep): weight of KL(z_0(x_cf) || z(x_f)) on D_f
    out_sample: float = 0.9  # step B (L_out): weight of CE(f(x_s), y_s) on D_s
    out_forget: float = 0.01  # step B (L_out): weight of CE(f(x_f), y_cf) on D_f

    def validate(self) -> None:
        """Raises ValueError naming the first weight that is negative or not finite (0 switches
        a term off, which ablations use)."""
        for f in dataclasses.fields(self):
            check_number(f"CaMU coefficient {f.name}", getattr(self, f.name), positive=False)


def init_train_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
    )


def init_camu_state(
    variables: dict, kl_tx: optax.GradientTransformation, ce_tx: optax.GradientTransformation
) -> CamuState:
    """f_theta starts as a copy of the original model, with fresh optimizer states."""
    params = jax.tree.map(jnp.array, variables["params"])
    return CamuState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=jax.tree.map(jnp.array, variables["batch_stats"]),
        kl_opt_state=kl_tx.init(params),
        ce_opt_state=ce_tx.init(params),
    )


def _finite(metrics: dict) -> dict:
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
    return new_state, _finite({"loss": loss})


def camu_step(
    state: CamuState,
    batch: dict,
    *,
    model: nn.Module,
    kl_tx: optax.GradientTransformation,
    ce_tx: optax.GradientTransformation,
    coefficients: CamuCoefficients = CamuCoefficients(),
) -> tuple[CamuState, dict]:
    """The reference's two-optimizer double step.

    batch (all `[b, ...]`): `x_f`, `x_s` (inputs), `y_s`, `y_cf` (labels), `z0_s`, `z0_cf`
    (embeddings of the frozen original on x_s and x_cf), `mask_f`, `mask_s`.

    Step A minimises L_rep with `kl_tx` and leaves the classifier head (`head_modules`)
    untouched, as PyTorch's optimizer1 does for parameters without a gradient; step B
    recomputes the forward pass on the parameters step A produced and minimises L_out with
    `ce_tx`. Forward passes run in the reference's
    order (A: x_s then x_f; B: x_f then x_s), which fixes how BatchNorm statistics evolve.
    """
    c = coefficients

    def rep_loss(params):
        _, z_s, bs = apply_model(
            model, params, state.batch_stats, batch["x_s"], train=True, mask=batch["mask_s"]
        )
        _, z_f, bs = apply_model(model, params, bs, batch["x_f"], train=True, mask=batch["mask_f"])
        loss = losses.representation_loss(
            student_sample=z_s,
            teacher_sample=batch["z0_s"],
            student_forget=z_f,
            teacher_counterfactual=batch["z0_cf"],
            sample_weights=batch["mask_s"],
            forget_weights=batch["mask_f"],
            sample_coef=c.rep_sample,
            forget_coef=c.rep_forget,
        )
        return loss, bs

    (l_rep, batch_stats), grads = jax.value_and_grad(rep_loss, has_aux=True)(state.params)
    updates, kl_opt_state = kl_tx.update(grads, state.kl_opt_state, state.params)
    # The head gets no gradient from L_rep; PyTorch's optimizer1 then skips it entirely (no
    # Adam step, no weight decay), so its step-A update is dropped here.
    heads = head_modules(model)
    if unknown := [h for h in heads if h not in updates]:
        raise ValueError(
            f"{type(model).__name__}.head_modules names {unknown}, which are not top-level "
            f"parameter collections (those are {sorted(updates)})"
        )
    updates = {k: jax.tree.map(jnp.zeros_like, u) if k in heads else u for k, u in updates.items()}
    params = optax.apply_updates(state.params, updates)

    def out_loss(params):
        logits_f, _, bs = apply_model(
            model, params, batch_stats, batch["x_f"], train=True, mask=batch["mask_f"]
        )
        logits_s, _, bs = apply_model(
            model, params, bs, batch["x_s"], train=True, mask=batch["mask_s"]
        )
        loss = losses.output_loss(
            sample_logits=logits_s,
            sample_labels=batch["y_s"],
            forget_logits=logits_f,
            counterfactual_labels=batch["y_cf"],
            sample_weights=batch["mask_s"],
            forget_weights=batch["mask_f"],
            sample_coef=c.out_sample,
            forget_coef=c.out_forget,
        )
        return loss, bs

    (l_out, batch_stats), grads = jax.value_and_grad(out_loss, has_aux=True)(params)
    updates, ce_opt_state = ce_tx.update(grads, state.ce_opt_state, params)
    params = optax.apply_updates(params, updates)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        kl_opt_state=kl_opt_state,
        ce_opt_state=ce_opt_state,
    )
    return new_state, _finite({"loss_rep": l_rep, "loss_out": l_out})
