"""Pieces shared by the teacher, noise and relabelling methods: mixed batches, KL divergences,
fixed subsets of D_r.

Several methods train on a *shuffled union* of pools (Bad Teacher: D_f and a D_r subset;
UNSIR: noise and a D_r subset; RL and Amnesiac: D_f and D_r) or alternate between two pools
(SCRUB). `union_plan` is the one union mechanism: it lays the pools' items out in one
`[steps, batch]` grid (a position holds an item of exactly one pool). On the engine every pool
is then a stream with its own `*_ids`/`*_mask` columns and `merge` builds the one batch the
model sees, so a step costs one forward pass of `batch` rows, as in the references (the
relabelling methods turn the grid into one stream of rows and labels instead:
`camu_jax.methods.relabel.relabelled_plan`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy


def union_plan(
    rng: np.random.Generator, pools: dict[str, np.ndarray], batch_size: int
) -> dict[str, np.ndarray]:
    """One shuffled pass over the union of `pools` (name -> item ids of that pool), cut into
    batches of `batch_size` (a `DataLoader(shuffle=True)` over a concatenated dataset).

    Returns `{<name>_ids, <name>_mask}` per pool, each `[steps, batch_size]`: position (j, k)
    holds an item of the pool whose mask is 1 there (at most one); the last batch is padded.
    """
    names = list(pools)
    ids = np.concatenate([np.asarray(pools[n], np.int64) for n in names])
    tags = np.concatenate([np.full(len(pools[n]), i) for i, n in enumerate(names)])
    order = rng.permutation(len(ids))
    steps = -(-len(ids) // batch_size)
    out = {}
    for i, n in enumerate(names):
        pid = np.zeros(steps * batch_size, np.int32)
        mask = np.zeros(steps * batch_size, np.float32)
        here = tags[order] == i
        pid[: len(ids)][here] = ids[order][here]
        mask[: len(ids)][here] = 1.0
        out[f"{n}_ids"] = pid.reshape(steps, batch_size)
        out[f"{n}_mask"] = mask.reshape(steps, batch_size)
    return out


def merge(parts: list[dict]) -> dict:
    """One batch from stream batches laid out by `union_plan` (`x`, `y`, `mask` each; at most
    one mask is 1 at a position): `x`, `y`, `mask`, and `which` (`[batch]`, the index of the
    part a position comes from; 0 at padding)."""
    x, y, mask = parts[0]["x"], parts[0]["y"], parts[0]["mask"]
    which = jnp.zeros(mask.shape, jnp.int32)
    for i, p in enumerate(parts[1:], start=1):
        here = p["mask"] > 0
        x = jnp.where(here.reshape(-1, *([1] * (x.ndim - 1))), p["x"], x)
        y = jnp.where(here, p["y"], y)
        mask = mask + p["mask"]
        which = jnp.where(here, i, which)
    return {"x": x, "y": y, "mask": mask, "which": which}


def kl_rows(
    *, student_logits: jax.Array, teacher_probs: jax.Array, temperature: float
) -> jax.Array:
    """`[batch]` KL(teacher || softmax(student / T)) per row; `teacher_probs` already
    tempered. `xlogy` gives 0 where the teacher probability is 0, as PyTorch's `kl_div`."""
    teacher_probs = jax.lax.stop_gradient(teacher_probs)
    log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    return jnp.sum(xlogy(teacher_probs, teacher_probs) - teacher_probs * log_q, axis=-1)


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    # `where`, not only `*`: a non-finite value in a padded row must not poison the sum.
    return jnp.sum(jnp.where(mask > 0, values, 0.0) * mask)


def per_class_subset(rng: np.random.Generator, labels: np.ndarray, per_class: int) -> np.ndarray:
    """Positions (into `labels`) of at most `per_class` items of every class present, drawn
    without replacement; sorted."""
    keep = []
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        keep.append(rng.choice(where, size=min(per_class, where.size), replace=False))
    return np.sort(np.concatenate(keep)).astype(np.int32)


def fraction_subset(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    """Positions of `int(fraction * n)` (at least one) of `n` items, drawn without replacement
    (`random.sample(retain, int(0.3 * len(retain)))` of the references); sorted."""
    size = max(1, int(fraction * n))
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int32)
