"""Supervised training loops (original model, retrain-from-scratch, relearning).

An epoch runs as a few jitted `lax.scan` calls over device-resident uint8 data: the host only
sends `[steps, batch]` index plans. The state is donated, checked for non-finite losses after
every chunk (before anything is saved) and checkpointed per epoch, so an interrupted run resumes
exactly where the last complete epoch ended.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh
from tqdm.auto import tqdm

from camu_jax import checkpointing, sharding
from camu_jax.data.pipeline import InputSpec, item_keys, preprocess, shuffled_batches
from camu_jax.steps import adam_l2, init_train_state, train_step


def scan_steps(step, make_batch, *, active_fn):
    """`lax.scan` body factory: steps whose plan is all padding (`active_fn` false) leave the
    state untouched, so one fixed chunk length (one compile) serves every epoch and data set."""

    def body(state, xs):
        batch = make_batch(state, xs)
        metric_shapes = jax.eval_shape(step, state, batch)[1]

        def skip(state, batch):
            zeros = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metric_shapes)
            return state, {**zeros, "finite": jnp.array(True)}

        active = active_fn(xs)
        state, metrics = jax.lax.cond(active, step, skip, state, batch)
        return state, {**metrics, "active": active}

    return body


def pad_plan(plan: tuple[np.ndarray, ...], chunk: int) -> tuple[np.ndarray, ...]:
    """Pads `[steps, batch]` plans with all-zero steps to a multiple of `chunk` steps."""
    steps = plan[0].shape[0]
    extra = -steps % chunk
    return tuple(np.concatenate([p, np.zeros((extra, *p.shape[1:]), p.dtype)]) for p in plan)


def make_train_chunk(model: nn.Module, tx, spec: InputSpec, mesh: Mesh):
    """Jitted `(state, images, labels, items, ids [k,b], mask [k,b], key) -> (state, metrics)`.

    Runs k training steps; batch j uses items `items[ids[j]]`. The state is donated.
    """
    step = functools.partial(train_step, model=model, tx=tx)

    def run(state, images, labels, items, ids, mask, key):
        def make_batch(state, xs):
            ids_b, mask_b = xs
            rows = items[ids_b]
            keys = item_keys(jax.random.fold_in(key, state.step), ids_b) if spec.augment else None
            batch = {
                "image": preprocess(images[rows], spec, augment_keys=keys),
                "label": labels[rows],
                "mask": mask_b,
            }
            return sharding.constrain_batch(batch, mesh)

        body = scan_steps(step, make_batch, active_fn=lambda xs: jnp.sum(xs[1]) > 0)
        return jax.lax.scan(body, state, (ids, mask))

    return jax.jit(run, donate_argnums=0)


def chunk_means(metrics: dict, keys: tuple[str, ...]) -> dict[str, float]:
    """Means of `keys` over the active steps of a chunk's metrics."""
    active = np.asarray(metrics["active"], bool)
    return {k: float(np.mean(np.asarray(metrics[k])[active])) for k in keys}


def check_finite(metrics: dict, where: str) -> None:
    """Raises FloatingPointError naming the first non-finite loss (host-side check)."""
    finite = np.asarray(metrics["finite"])
    if finite.all():
        return
    first = int(np.argmin(finite))
    values = {k: float(np.asarray(v)[first]) for k, v in metrics.items() if k != "finite"}
    raise FloatingPointError(
        f"non-finite loss {values} at {where}, step {first} of the chunk; stopping before "
        "anything of this epoch is saved (lower the learning rate or check the inputs)"
    )


def train_model(
    model: nn.Module,
    variables: dict,
    *,
    images: jax.Array,
    labels: jax.Array,
    items: np.ndarray,
    spec: InputSpec,
    mesh: Mesh,
    epochs: int,
    seed: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    checkpoint_dir: str | Path | None = None,
    meta: dict | None = None,
    chunk_steps: int = 250,
    callback: Callable[[int, dict], None] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> tuple[dict, dict]:
    """The reference recipe: Adam(lr, coupled weight decay), cross-entropy, shuffled batches.

    Args:
      variables: initial `{'params', 'batch_stats'}`.
      images, labels: the whole training split, already on device (`sharding.replicate`).
      items: `[n]` indices of the items to train on (all of D, or D_r for retraining).
      checkpoint_dir: where to save a `TrainState` after every epoch and resume from.
      meta: JSON description stored with (and checked against) the checkpoint.
      chunk_steps: steps per jitted call; `callback(global_step, variables)` runs after each.

    Returns `(variables, info)` with info `{'epochs_run', 'resumed_from', 'losses', 'seconds'}`.
    A finished run in `checkpoint_dir` is restored and returned without training.
    """
    sharding.check_batch_size(batch_size, mesh)
    if len(items) == 0:
        raise ValueError("cannot train on an empty set of items")
    tx = adam_l2(learning_rate, weight_decay)
    state = sharding.replicate(init_train_state(variables, tx), mesh)
    meta = dict(meta or {})
    start, seconds = 0, 0.0
    if checkpoint_dir is not None and checkpointing.latest_step(checkpoint_dir) is not None:
        start, state, saved = checkpointing.restore(
            checkpoint_dir, abstract_state=checkpointing.abstract_like(state), expected_meta=meta
        )
        start, seconds = min(start, epochs), float(saved.get("seconds", 0.0))
    t0 = time.perf_counter() - seconds
    run = make_train_chunk(model, tx, spec, mesh)
    # Plans index a full-length item table so that training on D and on D_r share one compile.
    n_total = images.shape[0]
    table = np.zeros(max(n_total, len(items)), np.int32)
    table[: len(items)] = items
    items_dev = sharding.replicate(table, mesh)
    chunk = max(1, min(chunk_steps, -(-n_total // batch_size)))
    key = jax.random.key(seed)
    steps_per_epoch = -(-len(items) // batch_size)
    losses = []
    bar = tqdm(
        total=epochs * steps_per_epoch,
        initial=start * steps_per_epoch,
        desc=desc,
        unit="step",
        disable=not progress,
        leave=False,
    )
    for epoch in range(start, epochs):
        ids, mask = shuffled_batches(
            len(items), batch_size, np.random.default_rng([seed, 3, epoch])
        )
        for lo in range(0, len(ids), chunk_steps):
            hi = min(lo + chunk_steps, len(ids))
            chunk = sharding.shard_batch((ids[lo:hi], mask[lo:hi]), mesh, axis=1)
            state, metrics = run(state, images, labels, items_dev, *chunk, key)
            metrics = jax.device_get(metrics)
            check_finite(metrics, f"{desc} epoch {epoch + 1}")
            losses.append(float(np.mean(metrics["loss"])))
            bar.update(hi - lo)
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
            if callback is not None:
                callback(epoch * steps_per_epoch + hi, state_variables(state))
        if checkpoint_dir is not None:
            seconds = time.perf_counter() - t0
            checkpointing.save(checkpoint_dir, epoch + 1, state, {**meta, "seconds": seconds})
    jax.block_until_ready(state)
    bar.close()
    info = {
        "epochs_run": epochs - start,
        "resumed_from": start,
        "losses": losses,
        "seconds": time.perf_counter() - t0,  # Training time, earlier sessions' included.
    }
    return state_variables(state), info


def state_variables(state) -> dict:
    """`{'params', 'batch_stats'}` of a training or unlearning state."""
    return {"params": state.params, "batch_stats": state.batch_stats}
