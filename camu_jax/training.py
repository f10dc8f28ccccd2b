"""Supervised training loops (original model, retrain-from-scratch, relearning).

Data stay on device as uint8; the host only sends `[steps, batch]` index plans, run as jitted
`lax.scan` chunks on accelerators and as one jitted call per step on CPU (`StepRunner`). The
state is donated, checked for non-finite losses and parameters after every chunk (before
anything is saved) and checkpointed per epoch, so an interrupted run resumes where the last
complete epoch ended.
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


def default_use_scan() -> bool:
    """Scan chunks of steps on accelerators (one launch per chunk); one jitted call per step on
    CPU, where XLA runs convolutions inside a `while` loop ~10x slower (measured on the CNN)."""
    return jax.default_backend() != "cpu"


class StepRunner:
    """Runs `[k, batch]` plans of steps: `state, metrics = runner(state, consts, plan)`.

    `make_batch(state, consts, xs)` builds one step's batch from one plan row `xs` (inside
    jit); `step(state, batch) -> (state, metrics)`. In scan mode a chunk is one jitted
    `lax.scan` whose all-padding steps (`active_fn` false) leave the state untouched, so one
    chunk length (one compile) serves every epoch; in loop mode each active row is one jitted
    call. Either way the state is donated and metrics come back stacked `[k]` with `active`.
    """

    def __init__(self, step, make_batch, mesh: Mesh, *, active_fn, use_scan: bool | None = None):
        self.mesh = mesh
        self.active_fn = active_fn
        self.use_scan = default_use_scan() if use_scan is None else use_scan
        # Fake CPU devices can deadlock in an all-reduce unless every step is waited for.
        self.sync = jax.default_backend() == "cpu" and mesh.devices.size > 1

        def one(state, consts, xs):
            return step(state, make_batch(state, consts, xs))

        def scan(state, consts, plan):
            def body(state, xs):
                batch = make_batch(state, consts, xs)
                shapes = jax.eval_shape(step, state, batch)[1]

                def skip(state, batch):
                    zeros = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), shapes)
                    return state, {**zeros, "finite": jnp.array(True)}

                active = active_fn(xs)
                state, metrics = jax.lax.cond(active, step, skip, state, batch)
                return state, {**metrics, "active": active}

            return jax.lax.scan(body, state, plan)

        self._one = jax.jit(one, donate_argnums=0)
        self._scan = jax.jit(scan, donate_argnums=0)

    def __call__(self, state, consts, plan: tuple[np.ndarray, ...]):
        if self.use_scan:
            return self._scan(state, consts, sharding.shard_batch(plan, self.mesh, axis=1))
        rows = []
        for j in range(plan[0].shape[0]):
            xs = tuple(p[j] for p in plan)
            if not self.active_fn(xs):
                continue
            state, metrics = self._one(state, consts, sharding.shard_batch(xs, self.mesh))
            if self.sync:
                jax.block_until_ready(state)
            rows.append(metrics)
        stacked = jax.tree.map(lambda *m: jnp.stack(m), *rows)
        return state, {**stacked, "active": np.ones(len(rows), bool)}


def pad_plan(plan: tuple[np.ndarray, ...], chunk: int) -> tuple[np.ndarray, ...]:
    """Pads `[steps, batch]` plans with all-zero steps to a multiple of `chunk` steps."""
    steps = plan[0].shape[0]
    extra = -steps % chunk
    return tuple(np.concatenate([p, np.zeros((extra, *p.shape[1:]), p.dtype)]) for p in plan)


def make_train_runner(model: nn.Module, tx, spec: InputSpec, mesh: Mesh, use_scan=None):
    """Training steps over device-resident data: consts `(images, labels, items, key)`, plan
    `(ids [k, b], mask [k, b])`; batch j uses items `items[ids[j]]`."""
    step = functools.partial(train_step, model=model, tx=tx)

    def make_batch(state, consts, xs):
        images, labels, items, key = consts
        ids_b, mask_b = xs
        rows = items[ids_b]
        keys = item_keys(jax.random.fold_in(key, state.step), ids_b) if spec.augment else None
        batch = {
            "image": preprocess(images[rows], spec, augment_keys=keys),
            "label": labels[rows],
            "mask": mask_b,
        }
        return sharding.constrain_batch(batch, mesh)

    return StepRunner(step, make_batch, mesh, active_fn=any_real_example, use_scan=use_scan)


def any_real_example(xs) -> bool:
    """A plan row is active when its mask (second entry) marks at least one real example."""
    return xs[1].sum() > 0


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


@jax.jit
def all_finite(tree) -> jax.Array:
    """One on-device reduction: whether every leaf of `tree` is finite."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def check_finite_state(finite, variables: dict, where: str) -> None:
    """Raises FloatingPointError naming the first non-finite leaf of `variables` when `finite`
    (`all_finite(variables)`, fetched with the chunk's metrics) is false.

    The last step of a chunk can turn the parameters non-finite while its loss, computed before
    the update, is still finite; this check keeps such a state from being saved or returned.
    """
    if bool(finite):
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]:
        leaf = np.asarray(leaf)
        if not np.isfinite(leaf).all():
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            raise FloatingPointError(
                f"non-finite parameters at {where}: {name} has "
                f"{int((~np.isfinite(leaf)).sum())} of {leaf.size} entries NaN or inf; stopping "
                "before anything of this epoch is saved (lower the learning rate or check the "
                "inputs)"
            )
    raise FloatingPointError(f"non-finite parameters at {where}")


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
    use_scan: bool | None = None,
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
      chunk_steps: steps between host checks (NaN, progress); `callback(global_step,
        variables)` runs after each chunk.
      use_scan: run a chunk as one `lax.scan` (default: on accelerators, not on CPU).

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
    run = make_train_runner(model, tx, spec, mesh, use_scan)
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
        plan = shuffled_batches(len(items), batch_size, np.random.default_rng([seed, 3, epoch]))
        ids, mask = pad_plan(plan, chunk)
        for lo in range(0, len(ids), chunk):
            part = (ids[lo : lo + chunk], mask[lo : lo + chunk])
            state, metrics = run(state, (images, labels, items_dev, key), part)
            metrics, finite = jax.device_get((metrics, all_finite(state_variables(state))))
            check_finite(metrics, f"{desc} epoch {epoch + 1}")
            check_finite_state(finite, state_variables(state), f"{desc} epoch {epoch + 1}")
            done = min(lo + chunk, steps_per_epoch)
            losses.append(chunk_means(metrics, ("loss",))["loss"])
            bar.update(done - min(lo, steps_per_epoch))
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
            if callback is not None:
                callback(epoch * steps_per_epoch + done, state_variables(state))
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
