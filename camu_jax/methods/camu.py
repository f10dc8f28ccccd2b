"""CaMU (Shen et al., SDM 2024, arXiv 2401.17504) as a method of the engine.

Counterfactuals are built once: pairing and labels on the host (`make_counterfactuals`), the
noise of item i a fixed function of i; the frozen original's embeddings of them, and of D_s
when inputs are not augmented, are computed once in eval mode for every member in one batched
pass. The reference recomputes both teacher passes every step; the values are the same. Each
step is the reference's two-optimizer double step (`camu_jax.steps.camu_step`) on a D_f batch
zipped with a D_s batch.
"""

from __future__ import annotations

import dataclasses
import functools

from camu_jax import engine
from camu_jax.counterfactual import make_counterfactuals
from camu_jax.data import catalog
from camu_jax.evaluation import predict
from camu_jax.methods.base import Method, Stage, stream_batch, zip_plan
from camu_jax.models import apply_model
from camu_jax.steps import CamuCoefficients, adam_l2, camu_step, check_number, init_camu_state


@dataclasses.dataclass(frozen=True)
class CamuConfig(Method):
    """Hyperparameters of CaMU unlearning (defaults: the reference's MNIST class preset)."""

    name = "camu"
    fixed_augment = ("forget",)  # x_f and x_cf keep one augmentation per item, as prepared

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


def _program(config: CamuConfig, model, spec, mesh) -> engine.Program:
    kl_tx = adam_l2(config.kl_lr, config.weight_decay)
    ce_tx = adam_l2(config.impair_lr, config.weight_decay)
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
        }

    step = functools.partial(
        camu_step, model=model, kl_tx=kl_tx, ce_tx=ce_tx, coefficients=config.coefficients
    )
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
