"""Teacher-student unlearning: Bad Teacher (Chundawat et al., AAAI 2023) and SCRUB (Kurmanji et
al., NeurIPS 2023). The frozen original is the (competent) teacher; the student starts as a
copy of it. Teachers live in member data (stacked variables on device) and run in eval mode
inside each step, on the step's own inputs (so augmented inputs get their teachers' outputs):
both are one-optimizer `LossMethod`s whose `make_batch` adds the teachers' outputs (and the
member's data settings) to the merged batch their `loss` reads.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from camu_jax import keys as host_keys
from camu_jax import sharding
from camu_jax.data.pipeline import shuffled_batches
from camu_jax.methods.base import stream_batch
from camu_jax.methods.finetune import LossMethod, ce, forward, setting
from camu_jax.methods.mixing import fraction_subset, kl_rows, masked_sum, merge, union_plan
from camu_jax.models import apply_model, init_variables
from camu_jax.steps import adam_l2_traced, cast_like, check_number

_BAD_TAG = 0xBAD7
_SCRUB_TAG = 0x5C2B


def _logits(model, variables, x):
    return apply_model(model, variables["params"], variables["batch_stats"], x, train=False)[0]


def _with_settings(merged: dict, batch: dict) -> dict:
    """`merged` with `batch`'s data settings (where it has them)."""
    if "settings" in batch:
        merged["settings"] = batch["settings"]
    return merged


# ------------------------------------------------------------------------------ Bad Teacher


@dataclasses.dataclass(frozen=True)
class BadTeacher(LossMethod):
    """Bad Teacher ("Can Bad Teaching Induce Forgetting? Unlearning in Deep Networks Using an
    Incompetent Teacher", Chundawat, Tarun, Mandal, Kankanhalli, AAAI 2023; official code
    `vikram2000b/bad-teaching-unlearning`, `unlearn.py: blindspot_unlearner`, notebook
    `CIFARSuper20_Rocket_Unlearn.ipynb`).

    The student distils, on each item of a shuffled union of D_f and a random 30 % of D_r, the
    softened outputs of the *incompetent* teacher (a randomly initialised model of the same
    architecture, seeded per member) if the item is in D_f, else of the competent teacher (the
    frozen original): `F.kl_div(log_softmax(s / T), p_teacher)` with PyTorch's default
    `reduction='mean'`, i.e. divided by batch x classes. Official settings: KL temperature 1,
    Adam lr 1e-4 (no weight decay), batch 256, 1 epoch. For the MNIST CNN the lr and epochs are
    tuned (docs/methods.md, "bad_teacher").
    """

    name = "bad_teacher"
    stage = "distill"
    title = "Bad Teacher"
    settings_as_data = True  # learning_rate, temperature
    # The D_r share sets how many items, so how many steps, an epoch has (the plan's shape).
    static_settings = ("retain_fraction",)

    epochs: int = 1  # MNIST CNN, tuned (docs/methods.md)
    learning_rate: float = 0.01  # MNIST CNN, tuned (docs/methods.md)
    batch_size: int = 256
    temperature: float = 1.0
    retain_fraction: float = 0.3

    def validate(self) -> None:
        super().validate()
        if self.retain_fraction > 1:
            raise ValueError(
                f"bad_teacher retain_fraction must lie in (0, 1], got {self.retain_fraction!r}"
            )

    def member_arrays(self, ctx):
        return {"bad_teacher_key": host_keys.fold_in(host_keys.key_data(ctx.seed), _BAD_TAG)}

    def prepare(self, model, originals, data, host):
        # Member by member, key data in: the program that initialised the originals (compiled
        # once per model and shape), not a vmapped one of its own. Threefry draws each key's
        # bits on their own, so the values are those a vmapped init gives.
        bad = [init_variables(model, k, data.input_shape) for k in host["bad_teacher_key"]]
        bad = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *bad)
        # Same dtypes as the original (float64 in the equivalence tests).
        bad = jax.tree.map(lambda b, o: np.asarray(b).astype(o.dtype), bad, originals)
        return {"teacher": originals, "bad_teacher": sharding.shard_members(bad, data.mesh)}

    def plan(self, ctx, epoch):
        rng = ctx.rng(_BAD_TAG, 1)  # the D_r subset is drawn once per run
        subset = fraction_subset(rng, len(ctx.remain), self.retain_fraction)
        pools = {"f": np.arange(len(ctx.forget)), "r": subset}
        return union_plan(ctx.rng(_BAD_TAG, 2, epoch), pools, self.batch_size)

    def tx(self, batch=None):
        return adam_l2_traced(setting(self, batch or {}, "learning_rate"), 0.0)

    def make_batch(self, model, spec, mesh):
        make = stream_batch(self, spec, mesh)

        def make_batch(state, shared, member, row):
            b = make(state, shared, member, row)
            m = _with_settings(merge([b["remain"], b["forget"]]), b)  # which == 1: a D_f item
            good = _logits(model, member["teacher"], m["x"])
            bad = _logits(model, member["bad_teacher"], m["x"])
            temp = cast_like(setting(self, b, "temperature"), good)
            good, bad = jax.nn.softmax(good / temp, axis=-1), jax.nn.softmax(bad / temp, axis=-1)
            m["teacher_probs"] = jnp.where((m["which"] == 1)[:, None], bad, good)
            return m

        return make_batch

    def loss(self, model, params, batch_stats, batch, extra):
        logits, _, batch_stats = forward(model, params, batch_stats, batch)
        rows = kl_rows(
            student_logits=logits,
            teacher_probs=batch["teacher_probs"],
            temperature=cast_like(setting(self, batch, "temperature"), logits),
        )
        count = jnp.maximum(jnp.sum(batch["mask"]), 1.0) * logits.shape[-1]
        return masked_sum(rows, batch["mask"]) / count, (batch_stats, {})


# ------------------------------------------------------------------------------ SCRUB


@dataclasses.dataclass(frozen=True)
class Scrub(LossMethod):
    """SCRUB ("Towards Unbounded Machine Unlearning", Kurmanji, Triantafillou, Hayes, Triantafillou,
    NeurIPS 2023; official code `meghdadk/SCRUB`, `large_scale_unlearning.ipynb` with
    `thirdparty/repdistiller/helper/loops.py: train_distill`).

    Student from the original, teacher = the frozen original. Each epoch: if it is one of the
    first `msteps`, one *max* pass over D_f (minimise -KL(teacher || student)), then one *min*
    pass over D_r (minimise gamma * CE + alpha * KL); KL is `DistillKL(T)`:
    sum-KL of the T-softened outputs x T^2 / batch. One SGD serves both passes (its momentum
    carries over), its lr multiplied by `lr_decay_rate` per `lr_decay_epochs` entry below the
    (1-based) epoch, as `adjust_learning_rate`. Official CIFAR settings: SGD lr 5e-4, momentum
    0.9, weight decay 5e-4, gamma 0.99, alpha 0.001, T 4, msteps 2, 3 epochs, lr decay at
    epochs (3, 5, 9) by 0.1 (not reached in 3 epochs), D_f batches of 512, D_r batches of 256.

    Max and min steps are one program: a step is a max step when its plan row holds D_f items.
    Both batches share one grid `merged_width` wide (the larger batch size rounded up to a
    multiple of `batch_size`), so a step costs one forward pass of that width. For the MNIST
    CNN the lr and epochs are tuned (docs/methods.md, "scrub").
    """

    name = "scrub"
    stage = "scrub"
    title = "SCRUB"
    # learning_rate, momentum, weight_decay, gamma, alpha, temperature; lr_decay_rate through
    # the plan (`lr_scale`: drawn per member from its own config, like any plan).
    settings_as_data = True

    epochs: int = 3  # MNIST CNN, tuned (docs/methods.md)
    msteps: int = 2
    learning_rate: float = 0.0005  # MNIST CNN, tuned (docs/methods.md)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    gamma: float = 0.99
    alpha: float = 0.001
    temperature: float = 4.0
    forget_batch_size: int = 512
    batch_size: int = 256  # D_r batches
    lr_decay_epochs: tuple[int, ...] = (3, 5, 9)
    lr_decay_rate: float = 0.1

    def _nonneg(self):
        return ("weight_decay", "momentum", "msteps", "gamma", "alpha")

    def validate(self) -> None:
        super().validate()
        for e in self.lr_decay_epochs:
            check_number("scrub lr_decay_epochs entry", e, integer=True)

    @property
    def merged_width(self) -> int:
        rb = self.batch_size
        return -(-max(self.forget_batch_size, rb) // rb) * rb

    def prepare(self, model, originals, data, host):
        return {"teacher": originals}

    def plan(self, ctx, epoch):
        width = self.merged_width
        rng = ctx.rng(_SCRUB_TAG, epoch)

        def widen(a):
            return np.pad(a, ((0, 0), (0, width - a.shape[1])))

        f_ids = np.zeros((0, width), np.int32)
        f_mask = np.zeros((0, width), np.float32)
        if epoch < self.msteps:
            ids, mask = shuffled_batches(len(ctx.forget), self.forget_batch_size, rng)
            f_ids, f_mask = widen(ids), widen(mask)
        ids, mask = shuffled_batches(len(ctx.remain), self.batch_size, rng)
        r_ids, r_mask = widen(ids), widen(mask)
        decays = int(np.sum(epoch + 1 > np.asarray(self.lr_decay_epochs)))
        steps = len(f_ids) + len(r_ids)
        return {
            "f_ids": np.concatenate([f_ids, np.zeros_like(r_ids)]),
            "f_mask": np.concatenate([f_mask, np.zeros_like(r_mask)]),
            "r_ids": np.concatenate([np.zeros_like(f_ids), r_ids]),
            "r_mask": np.concatenate([np.zeros_like(f_mask), r_mask]),
            "lr_scale": np.full((steps, width), self.lr_decay_rate**decays, np.float32),
        }

    def update_scale(self, batch):
        # PyTorch's SGD applies lr last (p -= lr * buf): scaling the update scales the lr.
        return batch["lr_scale"]

    def make_batch(self, model, spec, mesh):
        make = stream_batch(self, spec, mesh)

        def make_batch(state, shared, member, row):
            b = make(state, shared, member, row)
            m = _with_settings(merge([b["remain"], b["forget"]]), b)
            logits = _logits(model, member["teacher"], m["x"])
            temp = cast_like(setting(self, b, "temperature"), logits)
            m["teacher_probs"] = jax.nn.softmax(logits / temp, axis=-1)
            m["maximize"] = jnp.sum(b["forget"]["mask"]) > 0
            m["lr_scale"] = b["lr_scale"][0]
            return m

        return make_batch

    def loss(self, model, params, batch_stats, batch, extra):
        v = functools.partial(setting, self, batch)
        logits, _, batch_stats = forward(model, params, batch_stats, batch)
        temp = cast_like(v("temperature"), logits)
        rows = kl_rows(
            student_logits=logits, teacher_probs=batch["teacher_probs"], temperature=temp
        )
        kl = masked_sum(rows, batch["mask"]) * temp**2 / jnp.maximum(jnp.sum(batch["mask"]), 1)
        cls = ce(logits, batch["y"], batch["mask"])
        gamma, alpha = cast_like(v("gamma"), cls), cast_like(v("alpha"), kl)
        loss = jnp.where(batch["maximize"], -kl, gamma * cls + alpha * kl)
        return loss, (batch_stats, {"kl": kl, "ce": jnp.where(batch["maximize"], 0.0, cls)})
