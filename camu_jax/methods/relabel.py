"""Relabelling methods: fine-tune on D_f with wrong labels mixed into D_r.

Both methods train on the union D_f u D_r as ONE shuffled dataset (the official codes'
`ConcatDataset` / list of both sets in one `DataLoader`), D_f items carrying replacement
labels. The shuffle is the methods' one union mechanism (`camu_jax.methods.mixing.union_plan`);
since the replacement labels may change every epoch, the union travels as a stream of its own
(`relabelled_plan`, `union_batch`): a plan row holds the training rows, labels and mask of one
batch, so a batch mixes D_f and D_r items in the proportion the shuffle gives, as theirs do.
Replacement labels are drawn on the host from the member's seed (`MemberContext.rng`).

* RL, random labels (Golatkar et al., CVPR 2020; the "RL" baseline of Fan et al., ICLR 2024).
* Amnesiac unlearning as the benchmark suites run it (Graves et al., AAAI 2021).

The MNIST CNN settings and how they were chosen: docs/methods.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from camu_jax import sharding
from camu_jax.data.pipeline import item_keys, preprocess
from camu_jax.methods.finetune import LossMethod, ce, forward, setting
from camu_jax.methods.mixing import union_plan
from camu_jax.steps import adam_l2_traced

UNION_TAG = 8  # rng tags of the union shuffle and of the label draws (others use 4 to 7)
LABEL_TAG = 9


def relabelled_plan(ctx, epoch: int, batch_size: int, forget_labels: np.ndarray) -> dict:
    """One epoch over D_f u D_r shuffled together (`union_plan` of the two: a
    `DataLoader(shuffle=True)` over their concatenation, short last batch kept): `u_ids`
    (position in the union: D_f items first), `u_rows` (training rows), `u_y` (`forget_labels`
    for D_f items, the true label for D_r items), `u_mask`, each `[steps, batch]`."""
    forget, remain = ctx.forget, ctx.remain
    rows = np.concatenate([forget, remain]).astype(np.int32)
    labels = np.concatenate([forget_labels, ctx.labels[remain]]).astype(np.int32)
    pools = {"f": np.arange(len(forget)), "r": np.arange(len(remain))}
    plan = union_plan(ctx.rng(UNION_TAG, epoch), pools, batch_size)
    ids = np.where(plan["r_mask"] > 0, plan["r_ids"] + len(forget), plan["f_ids"])
    ids = ids.astype(np.int32)
    mask = plan["f_mask"] + plan["r_mask"]
    return {"u_ids": ids, "u_rows": rows[ids], "u_y": labels[ids], "u_mask": mask}


def union_batch(spec, mesh):
    """`make_batch` for `relabelled_plan` rows: `batch["union"] = {x, y, mask, ids}`, inputs
    augmented afresh every step (as a `DataLoader` with training transforms), and the member's
    data settings (`batch["settings"]`)."""

    def make_batch(state, shared, member, row):
        images, _ = shared
        keys = None
        if spec.augment:
            key = jax.random.fold_in(jax.random.wrap_key_data(member["step_key"]), state.step)
            keys = item_keys(key, row["u_ids"])
        part = {
            "x": preprocess(images[row["u_rows"]], spec, augment_keys=keys),
            "y": row["u_y"],
            "mask": row["u_mask"],
            "ids": row["u_ids"],
        }
        batch = {"union": sharding.constrain_batch(part, mesh)}
        if "settings" in member:
            batch["settings"] = member["settings"]
        return batch

    return make_batch


class UnionMethod(LossMethod):
    """Cross-entropy on batches of D_f u D_r, D_f relabelled by `forget_labels(ctx, epoch)`."""

    def forget_labels(self, ctx, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def plan(self, ctx, epoch):
        return relabelled_plan(ctx, epoch, self.batch_size, self.forget_labels(ctx, epoch))

    def make_batch(self, model, spec, mesh):
        return union_batch(spec, mesh)

    def loss(self, model, params, batch_stats, batch, extra):
        u = batch["union"]
        logits, _, batch_stats = forward(model, params, batch_stats, u)
        return ce(logits, u["y"], u["mask"]), (batch_stats, {})


@dataclasses.dataclass(frozen=True)
class RandomLabels(UnionMethod):
    """RL: fine-tune on D_f with random labels together with D_r (Golatkar et al., "Eternal
    Sunshine of the Spotless Net", CVPR 2020; the RL baseline of Fan et al., "SalUn", ICLR
    2024, `OPTML-Group/SalUn` `unlearn/RL.py`, its CIFAR-100 branch: `ConcatDataset` of the
    relabelled D_f and D_r, one shuffled loader). As that code, every D_f item gets a label
    drawn uniformly from all classes (its true label included) afresh each epoch; SGD momentum
    0.9, weight decay 5e-4, batch 256 (their defaults). For the MNIST CNN the lr and epochs
    are tuned on a validation split of D_r (docs/methods.md)."""

    name = "rl"
    title = "RL"
    settings_as_data = True  # learning_rate, momentum, weight_decay

    epochs: int = 2  # MNIST CNN, tuned (docs/methods.md)
    learning_rate: float = 0.03  # MNIST CNN, tuned (docs/methods.md)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256

    def forget_labels(self, ctx, epoch):
        # `np.random.randint(0, num_classes, ...)` inside their per-epoch function.
        return ctx.rng(LABEL_TAG, epoch).integers(0, ctx.num_classes, len(ctx.forget))


@dataclasses.dataclass(frozen=True)
class Amnesiac(UnionMethod):
    """Amnesiac unlearning as the benchmark suites implement it (Graves et al., "Amnesiac
    Machine Learning", AAAI 2021; `vikram2000b/bad-teaching-unlearning` and
    `if-loops/selective-synaptic-dampening` `amnesiac`): every D_f item gets one random
    *incorrect* label (uniform over the other classes, drawn once), and the model is trained
    on D_f u D_r shuffled together with Adam (no weight decay), lr 1e-4, batch 128, 3 epochs.

    The paper's own method subtracts the parameter updates of the training batches that held
    D_f items; that needs the training history, which camu-jax does not keep, so only the
    relabelling variant is offered. For the MNIST CNN the lr and epochs are tuned on a
    validation split of D_r (docs/methods.md)."""

    name = "amnesiac"
    title = "Amnesiac"
    settings_as_data = True  # learning_rate, weight_decay

    epochs: int = 1  # MNIST CNN, tuned (docs/methods.md)
    learning_rate: float = 0.0001  # MNIST CNN, tuned (docs/methods.md)
    weight_decay: float = 0.0
    batch_size: int = 128

    def tx(self, batch=None):
        v = functools.partial(setting, self, batch or {})
        return adam_l2_traced(v("learning_rate"), v("weight_decay"))

    def forget_labels(self, ctx, epoch):
        del epoch  # drawn once: the suites relabel D_f before training
        true = ctx.labels[ctx.forget]
        shift = ctx.rng(LABEL_TAG).integers(1, ctx.num_classes, len(true))
        return (true + shift) % ctx.num_classes
