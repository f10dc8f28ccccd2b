"""The relearning check of the CaMU paper, for a population of unlearned models.

Each model is fine-tuned on all of D_r for one epoch with the original recipe (Adam lr 1e-3,
coupled weight decay 1e-4, batch 32), and every `every` batches `acc(D_r) - acc(D_f)` is
recorded: a gap that stays flat means the forgotten information does not come back. All
models fine-tune together as one population, and their accuracies are measured in one batched
forward pass per record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn

from camu_jax import checks, engine, sharding
from camu_jax.data.pipeline import DeviceData
from camu_jax.data.splits import Splits
from camu_jax.prediction import predict
from camu_jax.training import TrainConfig, train_population


@dataclasses.dataclass(frozen=True)
class RelearnConfig:
    """One epoch of the original recipe, recorded every `every` batches on at most
    `max_items` items of D_r (a fixed random subset, for speed) and of D_f."""

    train: TrainConfig = TrainConfig(epochs=1)
    every: int = 100
    max_items: int = 10_000


def relearn(
    model: nn.Module,
    variables: Sequence[dict],
    *,
    data: DeviceData,
    splits: Sequence[Splits],
    seeds: Sequence[int],
    config: RelearnConfig = RelearnConfig(),
    names: Sequence[str] | None = None,
    population_size: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Relearning curves `{'batches': [...], 'gap': [...], 'losses': [...]}` (gap in accuracy
    points; losses the per-epoch means of the fine-tuning steps) for every model
    `variables[i]` on the run `splits[i]`, `seeds[i]` (which orders the batches)."""
    checks.check_splits(splits, data)
    count = len(variables)
    rows, n_remain = [], []
    for sp, seed in zip(splits, seeds, strict=True):
        rng = np.random.default_rng([seed, 5])
        k = min(config.max_items, sp.remain.size)
        remain = np.sort(rng.choice(sp.remain, k, replace=False))
        rows.append(np.concatenate([remain, sp.forget[: config.max_items]]))
        n_remain.append(k)
    labels = data.host_labels
    curves = [{"batches": [], "gap": []} for _ in range(count)]

    width = max(len(r) for r in rows)  # of every model, so every wave has one shape

    def gaps(stacked, members: list[int]) -> np.ndarray:
        size = jax.tree.leaves(stacked)[0].shape[0]
        # The mesh the wave runs on (the phase's placement, `engine.place`).
        mesh = jax.tree.leaves(stacked)[0].sharding.mesh
        placed = data.on(mesh)
        table = np.zeros((size, width), np.int32)
        for j, i in enumerate(members):
            table[j, : len(rows[i])] = rows[i]
        # Each process measures the models it owns, from the logits it holds.
        logits = sharding.owned_members(predict(model, stacked, placed, table, fetch=False), mesh)
        out = {}
        for j, i in enumerate(members):
            if j in logits:
                r, k = rows[i], n_remain[i]
                correct = logits[j][: len(r)].argmax(-1) == labels[r]
                out[j] = [100 * correct[:k].mean() - 100 * correct[k:].mean()]
        return sharding.gather_rows(out, sharding.member_owners(mesh, size), 1)[: len(members), 0]

    start = [
        {
            "params": jax.tree.map(np.asarray, v["params"]),
            "batch_stats": jax.tree.map(np.asarray, v["batch_stats"]),
        }
        for v in variables
    ]

    def record(stacked, done, members):
        new = [i for i in members if not curves[i]["batches"]]
        if new:
            # The gap before any fine-tuning (batch 0), measured where and as the wave runs
            # (its placement, its member count: the same program as every later point).
            leaf = jax.tree.leaves(stacked)[0]
            padded = engine.pad_members([start[i] for i in members], leaf.shape[0])
            before = sharding.shard_members(engine.stack(padded), leaf.sharding.mesh)
            for gap, i in zip(gaps(before, members), members, strict=True):
                if i in new:
                    curves[i]["batches"].append(0)
                    curves[i]["gap"].append(float(gap))
        for j, (gap, i) in enumerate(zip(gaps(stacked, members), members, strict=True)):
            if curves[i]["batches"][-1] < done[j]:
                curves[i]["batches"].append(int(done[j]))
                curves[i]["gap"].append(float(gap))

    trained = train_population(
        model,
        start,
        data=data,
        items=[sp.remain for sp in splits],
        seeds=seeds,
        config=config.train,
        names=names,
        population_size=population_size,
        chunk_steps=config.every,
        callback=record,
        progress=progress,
        desc="relearn",
    )
    for curve, (_, info) in zip(curves, trained, strict=True):
        # Each epoch's means of the fine-tuning steps (stage, epoch, steps, losses, learning
        # rates), as every other phase's models record theirs.
        curve["losses"] = info.get("epochs", [])
    return curves
