"""CaMU (Shen et al., SDM 2024, arXiv 2401.17504): everything of the method in one module.

* `CamuCoefficients`, `CamuState`, `init_camu_state` and `camu_step`: the reference's loss
  weights, state and two-optimizer double step (pure, un-jitted);
* `CamuConfig` (with `camu_preset`, the reference's presets): the method on the loop engine;
  its float settings (learning rates, weight decay, coefficients) are data: the step builds
  its optimizers (`camu_optimizers`) and loss weights from the member's settings, so one
  program serves every value and a population's members may differ in them;
* `unlearn` / `unlearn_population`: the entry points (also `camu_jax.unlearn`...).

Counterfactuals are built once: pairing and labels on the host (`make_counterfactuals`), the
noise of item i a fixed function of i; the frozen original's embeddings of them, and of D_s
when inputs are not augmented, are computed once in eval mode for every member in one batched
pass. The reference recomputes both teacher passes every step; the values are the same. Each
step is the reference's double step (`camu_step`) on a D_f batch zipped with a D_s batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

from camu_jax import engine, losses
from camu_jax.counterfactual import make_counterfactuals
from camu_jax.data import catalog
from camu_jax.data.pipeline import DeviceData
from camu_jax.data.splits import Splits
from camu_jax.methods.base import (
    Method,
    Stage,
    run_population,
    settings,
    stream_batch,
    zip_plan,
)
from camu_jax.models import apply_model, head_modules
from camu_jax.prediction import predict
from camu_jax.steps import adam_l2_traced, cast_like, check_number, with_finite

PyTree = Any


# ------------------------------------------------------------------------------ the step


@dataclasses.dataclass(frozen=True)
class CamuCoefficients:
    """Loss weights of the reference: L_rep = 0.5/0.5, L_out = 0.9 (D_s) / 0.01 (D_f, y_cf).

    Python floats, or (inside CaMU's program) a member's weights as scalar arrays: `camu_step`
    casts each to the dtype of the loss term it weights, as a float constant is."""

    rep_sample: float = 0.5  # step A (L_rep): weight of KL(z_0(x_s) || z(x_s)) on D_s
    rep_forget: float = 0.5  # step A (L_rep): weight of KL(z_0(x_cf) || z(x_f)) on D_f
    out_sample: float = 0.9  # step B (L_out): weight of CE(f(x_s), y_s) on D_s
    out_forget: float = 0.01  # step B (L_out): weight of CE(f(x_f), y_cf) on D_f

    def validate(self) -> None:
        """Raises ValueError naming the first weight that is negative or not finite (0 switches
        a term off, which ablations use)."""
        for f in dataclasses.fields(self):
            check_number(f"CaMU coefficient {f.name}", getattr(self, f.name), positive=False)


class CamuState(struct.PyTreeNode):
    """State of CaMU unlearning: one set of parameters, two optimizer states (step A, step B).

    The frozen original model is *not* part of it: it is a separate, never-donated argument.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    kl_opt_state: optax.OptState
    ce_opt_state: optax.OptState


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
            sample_coef=cast_like(c.rep_sample, jnp.result_type(z_s, batch["z0_s"])),
            forget_coef=cast_like(c.rep_forget, jnp.result_type(z_f, batch["z0_cf"])),
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
            sample_coef=cast_like(c.out_sample, logits_s),
            forget_coef=cast_like(c.out_forget, logits_f),
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
    return new_state, with_finite({"loss_rep": l_rep, "loss_out": l_out})


# ------------------------------------------------------------------------------ the method


@dataclasses.dataclass(frozen=True)
class CamuConfig(Method):
    """Hyperparameters of CaMU unlearning (defaults: the reference's MNIST class preset)."""

    name = "camu"
    title = "CaMU"
    fixed_augment = ("forget",)  # x_f and x_cf keep one augmentation per item, as prepared
    # Learning rates, weight decay and the four coefficients are per-member data (one program
    # for every value); no float setting fixes a shape.
    settings_as_data = True

    epochs: int = 2  # passes over D_f
    kl_lr: float = 4e-4  # step A (L_rep), the reference's KL_LR
    impair_lr: float = 1e-3  # step B (L_out), the reference's IMPAIR_LR
    batch_size: int = 32  # D_f items and D_s items per step (each)
    weight_decay: float = 1e-4  # coupled L2 of both Adam optimizers
    coefficients: CamuCoefficients = CamuCoefficients()

    def validate(self) -> None:
        """Raises ValueError naming the first bad value: epochs and batch size must be positive
        integers, learning rates positive and finite, weight decay and coefficients finite and
        non-negative. (Zero epochs would return the original model as "unlearned".)"""
        for name in ("epochs", "batch_size"):
            check_number(f"CaMU {name}", getattr(self, name), integer=True)
        for name in ("kl_lr", "impair_lr"):
            check_number(f"CaMU {name}", getattr(self, name))
        check_number("CaMU weight_decay", self.weight_decay, positive=False)
        self.coefficients.validate()

    def member_arrays(self, ctx):
        cf = make_counterfactuals(
            ctx.rng(6),
            forget_labels=ctx.labels[ctx.forget],
            sample_labels=ctx.labels[ctx.sample],
            num_classes=ctx.num_classes,
        )
        # x_cf of item i: the paired sample's fixed augmentation (key of item i) + its noise.
        return {"f_y_cf": cf.labels, "cf_rows": ctx.pad(ctx.sample[cf.pair], "forget")}

    def prepare(self, model, originals, data, host):
        augment = data.spec.augment
        out = {
            "f_z0_cf": predict(
                model,
                originals,
                data,
                host["cf_rows"],
                embedding=True,
                aug_keys=host["aug_key"] if augment else None,
                noise_keys=host["noise_key"],
                fetch=False,
            )
        }
        if augment:  # D_s gets a fresh augmentation every step: the teacher runs in the step.
            out["teacher"] = originals
        else:
            out["s_z0"] = predict(
                model, originals, data, host["sample_rows"], embedding=True, fetch=False
            )
        return out

    def stages(self):
        return (
            Stage(
                "unlearn",
                functools.partial(_program, self),
                functools.partial(zip_plan, a="f", b="s", batch_size=self.batch_size),
                self.epochs,
            ),
        )


def camu_optimizers(kl_lr, impair_lr, weight_decay):
    """`(kl_tx, ce_tx)`: the reference's two Adam optimizers (coupled L2, `adam_l2`) for steps A
    and B; the values may be a member's data settings (traced arrays). Their states' structure
    does not depend on the values."""
    return adam_l2_traced(kl_lr, weight_decay), adam_l2_traced(impair_lr, weight_decay)


def _program(config: CamuConfig, model, spec, mesh) -> engine.Program:
    # Every float setting is data (`CamuConfig.settings_as_data`): the optimizers and the loss
    # weights are built inside the step from the member's settings; `config` is the skeleton
    # (its learning rates, weight decay and coefficients are None).
    make = stream_batch(config, spec, mesh)

    def make_batch(state, shared, member, row):
        b = make(state, shared, member, row)
        f, s = b["forget"], b["sample"]
        if spec.augment:
            t = member["teacher"]
            _, z0_s, _ = apply_model(model, t["params"], t["batch_stats"], s["x"], train=False)
        else:
            z0_s = s["z0"]
        return {
            "x_f": f["x"],
            "x_s": s["x"],
            "y_s": s["y"],
            "y_cf": f["y_cf"],
            "z0_s": z0_s,
            "z0_cf": f["z0_cf"],
            "mask_f": f["mask"],
            "mask_s": s["mask"],
            "settings": settings(b),
        }

    def step(state, batch):
        s = settings(batch)
        kl_tx, ce_tx = camu_optimizers(s["kl_lr"], s["impair_lr"], s["weight_decay"])
        coefficients = CamuCoefficients(**s["coefficients"])
        return camu_step(
            state, batch, model=model, kl_tx=kl_tx, ce_tx=ce_tx, coefficients=coefficients
        )

    # The optimizer states' structure does not depend on the values: any serve `init`.
    kl_tx, ce_tx = camu_optimizers(0.0, 0.0, 0.0)
    init = functools.partial(init_camu_state, kl_tx=kl_tx, ce_tx=ce_tx)
    return engine.Program(init=init, step=step, make_batch=make_batch)


# The reference's per-scenario presets (camu_reference.md, section 4).
_PRESETS = {
    ("mnist", "random"): CamuConfig(epochs=10, kl_lr=4e-4, impair_lr=5e-4),
    ("mnist", "class"): CamuConfig(epochs=2, kl_lr=4e-4, impair_lr=1e-3),
    ("cifar", "random"): CamuConfig(epochs=10, kl_lr=1e-5, impair_lr=1e-4),
    ("cifar", "class"): CamuConfig(epochs=2, kl_lr=1e-5, impair_lr=5e-5),
}


def camu_preset(dataset: str, scenario: str) -> CamuConfig:
    """The reference preset for a dataset and scenario (`class` or `random`)."""
    family = catalog.info(dataset).family
    if scenario not in ("class", "random"):
        raise ValueError(f"unknown scenario {scenario!r}; allowed: class, random")
    return _PRESETS[(family, scenario)]


# ------------------------------------------------------------------------------ entry points


def unlearn_population(
    model: nn.Module,
    originals: Sequence[dict],
    *,
    data: DeviceData,
    splits: Sequence[Splits],
    seeds: Sequence[int],
    num_classes: int,
    config: CamuConfig,
    **kwargs,
) -> list[tuple[dict, dict]]:
    """Runs CaMU for every member (frozen original `originals[i]`, `splits[i]`, `seeds[i]`);
    see `camu_jax.methods.run_population` for the keyword arguments and `info`."""
    return run_population(
        config,
        model,
        originals,
        data=data,
        splits=splits,
        seeds=seeds,
        num_classes=num_classes,
        **kwargs,
    )


def unlearn(
    model: nn.Module,
    original: dict,
    *,
    data: DeviceData,
    splits: Splits,
    num_classes: int,
    config: CamuConfig,
    seed: int,
    **kwargs,
) -> tuple[dict, dict]:
    """Runs CaMU from the frozen `original` (never modified); `unlearn_population` with one
    member. Returns `(variables, info)`."""
    ((out, info),) = unlearn_population(
        model,
        [original],
        data=data,
        splits=[splits],
        seeds=[seed],
        num_classes=num_classes,
        config=config,
        **kwargs,
    )
    return out, info
