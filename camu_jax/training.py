"""Supervised training (original model, retrain-from-scratch, relearning) on the loop engine.

A population of trainings (one member per seed or per forget set) runs as one compiled program
(`camu_jax.engine`); `train_model` is a population of one. Data stay on device as uint8; the
host only sends `[members, steps, batch]` index plans. Losses and the state are checked for
non-finite values after every chunk (before anything is saved), and each member is
checkpointed at epoch ends, so an interrupted run resumes where its last saved epoch ended,
bit-identically: an epoch's plan depends only on (seed, epoch).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh
from tqdm.auto import tqdm

from camu_jax import checkpointing, checks, engine, sharding
from camu_jax.data.pipeline import (
    DeviceData,
    InputSpec,
    item_keys,
    preprocess,
    shuffled_batches,
)
from camu_jax.steps import adam_l2, check_number, init_train_state, train_step


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The reference's recipe for the original and the retrained model (`train.py: train`):
    Adam with coupled weight decay, cross-entropy, shuffled batches."""

    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4

    def validate(self) -> None:
        """Raises ValueError naming the first bad value."""
        for name in ("epochs", "batch_size"):
            check_number(name, getattr(self, name), integer=True)
        check_number("learning_rate", self.learning_rate)
        check_number("weight_decay", self.weight_decay, positive=False)


def train_program(model: nn.Module, tx, spec: InputSpec, mesh: Mesh) -> engine.Program:
    """Cross-entropy steps: member data `{'items' [n], 'key'}`, plan rows `{'ids', 'mask'}`;
    batch j uses items `items[ids[j]]`."""

    def make_batch(state, shared, member, row):
        images, labels = shared
        rows = member["items"][row["ids"]]
        keys = None
        if spec.augment:
            key = jax.random.fold_in(jax.random.wrap_key_data(member["key"]), state.step)
            keys = item_keys(key, row["ids"])
        batch = {
            "image": preprocess(images[rows], spec, augment_keys=keys),
            "label": labels[rows],
            "mask": row["mask"],
        }
        return sharding.constrain_batch(batch, mesh)

    return engine.Program(
        init=functools.partial(init_train_state, tx=tx),
        step=functools.partial(train_step, model=model, tx=tx),
        make_batch=make_batch,
    )


@functools.lru_cache(maxsize=16)
def _engine(model, learning_rate, weight_decay, spec, mesh, use_scan) -> engine.Engine:
    # One engine (one set of jitted functions) per recipe, so every call of a study with the
    # same shapes reuses its compiled programs.
    tx = adam_l2(learning_rate, weight_decay)
    program = train_program(model, tx, spec, mesh)
    return engine.Engine(program, mesh, use_scan=use_scan)


def epoch_plan(n_items: int, batch_size: int, seed: int, epoch: int) -> engine.Plan:
    """One epoch of a shuffled `DataLoader(batch_size)` over `n_items` items: `ids`, `mask`
    `[steps, batch]`; a fixed function of (seed, epoch), so a resumed run is bit-identical."""
    ids, mask = shuffled_batches(n_items, batch_size, np.random.default_rng([seed, 3, epoch]))
    return {"ids": ids, "mask": mask}


def _member_key(seed: int) -> np.ndarray:
    return np.asarray(jax.random.key_data(jax.random.key(seed)))


_HELD = contextvars.ContextVar("camu_jax_training_locks")


def _releases_locks(fn):
    """The checkpoint-directory locks that `fn` takes (`_lock_directories`) are released when
    it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as held:
            token = _HELD.set(held)
            try:
                return fn(*args, **kwargs)
            finally:
                _HELD.reset(token)

    return wrapper


def _lock_directories(members) -> dict:
    """`{member index: lock}`: one process at a time trains into a checkpoint directory, so
    a model that another run is training is waited for (saying so on stdout) and then
    restored. Taken in path order, so that two runs that share directories cannot each wait
    for the other; held until `train_population` ends. Process 0 writes every checkpoint
    and alone takes locks; the other processes read checkpoints once it holds them."""
    locks, by_path = {}, {}
    if jax.process_index() == 0:
        dirs = {m.index: Path(m.directory).absolute() for m in members if m.directory is not None}
        for i, path in sorted(dirs.items(), key=lambda item: str(item[1])):
            if path not in by_path:  # members with one directory share its lock
                by_path[path] = _HELD.get().enter_context(
                    checkpointing.lock_directory(path, wait=True)
                )
            locks[i] = by_path[path]
    sharding.from_process_zero(np.zeros((), np.int32))  # a barrier
    return locks


class _Member:
    """Bookkeeping of one member: where it starts, its checkpoint, its losses."""

    def __init__(self, index, name, items, seed, directory, meta, variables):
        self.index, self.name, self.items, self.seed = index, name, items, seed
        self.directory, self.meta = directory, dict(meta or {})
        self.start, self.seconds, self.losses = 0, 0.0, []
        self.variables = variables
        self.state = None  # a restored state (host), when resuming


@_releases_locks
def train_population(
    model: nn.Module,
    variables: Sequence[dict],
    *,
    data: DeviceData,
    items: Sequence[np.ndarray],
    seeds: Sequence[int],
    config: TrainConfig,
    names: Sequence[str] | None = None,
    checkpoint_dirs: Sequence[str | Path | None] | None = None,
    metas: Sequence[dict] | None = None,
    population_size: int | None = None,
    checkpoint_every: float = 60.0,
    chunk_steps: int = 250,
    callback: Callable[[dict, np.ndarray, list[int]], None] | None = None,
    use_scan: bool | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[tuple[dict, dict]]:
    """Trains every member (initial `variables[i]`, items `items[i]`, seed `seeds[i]`) with
    `config`, at most `population_size` members at a time (default: the layout `engine.place`
    chooses for the phase).

    Args:
      data: the training split on device.
      items: per member, `[n_i]` indices of the items to train on (D, or D_r).
      checkpoint_dirs: per member, where to save its `TrainState` and resume from (None: no
        checkpoint); `metas[i]` is the JSON identity stored with it and checked on restore.
        A member is saved at the end of an epoch when `checkpoint_every` seconds have passed
        since its last save, and always after its last epoch.
      callback: `callback(stacked_variables, done, members)` after every chunk: `done[j]` is
        how many steps of its epoch member `members[j]` of the wave has run (records every
        `chunk_steps` steps, e.g. the relearning curves).

    Returns per member `(variables, info)`, info `{'epochs_run', 'resumed_from', 'losses',
    'seconds', 'compile_seconds'}`; `seconds` is the member's share of its wave's wall time
    (earlier sessions' time included). A finished member is restored without training.
    """
    config.validate()
    checks.check_items(items, data)
    checks.check_model_classes(model, ("data", data))
    sharding.check_batch_size(config.batch_size, data.mesh)
    count = len(variables)
    names = list(names or [f"{desc} {i}" for i in range(count)])
    dirs = list(checkpoint_dirs or [None] * count)
    metas = list(metas or [None] * count)
    if not (len(items) == len(seeds) == len(names) == len(dirs) == len(metas) == count):
        raise ValueError("variables, items, seeds, names, checkpoint_dirs, metas differ in length")
    for name, it in zip(names, items, strict=True):
        if len(it) == 0:
            raise ValueError(f"{name}: cannot train on an empty set of items")
    tx = adam_l2(config.learning_rate, config.weight_decay)
    members = [
        _Member(i, names[i], np.asarray(items[i]), seeds[i], dirs[i], metas[i], variables[i])
        for i in range(count)
    ]
    results: list = [None] * count
    pending = []
    locks = _lock_directories(members)
    for m in members:
        if m.directory is not None and checkpointing.latest_step(m.directory) is not None:
            abstract = _abstract(jax.eval_shape(lambda v: init_train_state(v, tx), m.variables))
            m.start, state, saved = checkpointing.restore(
                m.directory, abstract_state=abstract, expected_meta=m.meta
            )
            m.start, m.seconds = min(m.start, config.epochs), float(saved.get("seconds", 0.0))
            m.state = jax.tree.map(np.asarray, state)
    # Processes that resumed from different epochs would run different programs and wait on
    # each other forever.
    sharding.agree(
        [m.start for m in members],
        f"the epochs already done by the {desc} models (read from their checkpoints)",
        "checkpoints must be on a filesystem that every host shares",
    )
    for m in members:
        if m.start >= config.epochs:
            results[m.index] = (_variables(m.state), _info(m, config, 0.0, 0.0))
            if m.index in locks:  # restored: another run may have it now
                locks[m.index].release()
        else:
            pending.append(m)
    if pending:

        def probe(mesh, size, timed):
            run = _engine(
                model, config.learning_rate, config.weight_decay, data.spec, mesh, use_scan
            )
            return _probe(run, pending, data.on(mesh), config, chunk_steps, size, timed)

        b = config.batch_size
        steps = sum((config.epochs - m.start) * -(-len(m.items) // b) for m in pending)
        placement = engine.place(
            population_size, len(pending), data.mesh, probe, steps=steps, what=desc
        )
        data = data.on(placement.mesh)
        run = _engine(
            model, config.learning_rate, config.weight_decay, data.spec, data.mesh, use_scan
        )
        size = placement.size
        for wave in engine.waves(len(pending), size):
            wave_members = [pending[i] for i in wave]
            for m, out in zip(
                wave_members,
                _train_wave(
                    run,
                    wave_members,
                    size,
                    data,
                    config,
                    chunk_steps,
                    callback,
                    checkpoint_every,
                    progress,
                    desc,
                ),
                strict=True,
            ):
                results[m.index] = out
    return results


def _prepare(run, members, size, data, config, chunk_steps):
    """A wave's device state and member data, and its chunk length."""
    mesh, b = data.mesh, config.batch_size
    padded = engine.pad_members(members, size)
    # Plans index a full-length item table, so training on D and on D_r share one compile.
    width = max(data.size, *(len(m.items) for m in members))
    tables = np.zeros((size, width), np.int32)
    for j, m in enumerate(padded):
        tables[j, : len(m.items)] = m.items
    member_data = sharding.shard_members(
        {"items": tables, "key": np.stack([_member_key(m.seed) for m in padded])}, mesh
    )
    state = run.init(engine.stack([m.variables for m in padded]))
    if any(m.state is not None for m in members):  # resumed members continue their state
        host = sharding.fetch(state)
        for j, m in enumerate(members):
            if m.state is not None:
                host = jax.tree.map(lambda h, r, j=j: _put(h, j, r), host, m.state)
        state = sharding.shard_members(host, mesh)
    return state, member_data, max(1, min(chunk_steps, -(-width // b)))


def _wave_plan(members, size, config, epoch, chunk):
    """The wave's `[size, steps, batch]` plan of one epoch (padding members and members past
    this epoch inactive)."""
    plans = []
    for j, m in enumerate(engine.pad_members(members, size)):
        plan = epoch_plan(len(m.items), config.batch_size, m.seed, epoch)
        if j >= len(members) or epoch < m.start:  # padding member, or already past this epoch
            plan = {k: np.zeros_like(v) for k, v in plan.items()}
        plans.append(plan)
    return engine.pad_steps(engine.stack_plans(plans), chunk)


def _probe(run, pending, data, config, chunk_steps, size, timed):
    """`engine.place`'s probe: bytes per member of a wave of the first `size` members (padded),
    and with `timed` the seconds of one of its steps, on a throwaway state."""
    members = pending[:size]
    state, member_data, chunk = _prepare(run, members, size, data, config, chunk_steps)
    plan = _wave_plan(members, size, config, min(m.start for m in members), chunk)
    part = {k: v[:, :chunk] for k, v in plan.items()}
    shared = (data.images, data.labels)
    need = run.memory_per_member(state, shared, member_data, part)
    if not timed:
        return need, None, 0.0
    return need, *run.step_seconds(state, shared, member_data, part)


def _train_wave(run, members, size, data, config, chunk_steps, callback, every, progress, desc):
    timer = engine.Timer()
    b = config.batch_size
    padded = engine.pad_members(members, size)
    real = len(members)
    state, member_data, chunk = _prepare(run, members, size, data, config, chunk_steps)
    shared = (data.images, data.labels)
    steps = [-(-len(m.items) // b) for m in members]
    first = min(m.start for m in members)
    total = sum((config.epochs - m.start) * s for m, s in zip(members, steps, strict=True))
    bar = tqdm(total=total, desc=desc, unit="step", disable=not _shows(progress), leave=False)
    last_save = [time.perf_counter()] * real
    names = [m.name for m in padded]
    for epoch in range(first, config.epochs):
        plan = _wave_plan(members, size, config, epoch, chunk)
        for lo in range(0, plan["ids"].shape[1], chunk):
            part = {k: v[:, lo : lo + chunk] for k, v in plan.items()}
            state, metrics = run(state, shared, member_data, part)
            engine.check_finite(metrics, names, f"{desc} epoch {epoch + 1}", state)
            for j, m in enumerate(members):
                means = engine.chunk_means(metrics, ("loss",), j)
                if means:
                    m.losses.append(means["loss"])
            advanced = int(np.asarray(metrics["active"], bool).sum())
            bar.update(advanced)
            if callback is not None:
                done = np.asarray([min(lo + chunk, s) for s in steps])
                callback(_variables(state), done, [m.index for m in members])
        if any(m.directory is not None for m in members):
            now = time.perf_counter()
            due = [
                m.directory is not None
                and epoch >= m.start
                and (epoch + 1 == config.epochs or now - last_save[j] >= every)
                for j, m in enumerate(members)
            ]
            # Clocks differ between processes; saving gathers the state (a collective), so
            # process 0's decision is everyone's.
            due = np.flatnonzero(sharding.from_process_zero(np.asarray(due, np.int32)))
            if len(due):
                host = engine.unstack(state, real)
                share = timer.seconds / real
                for j in due:
                    m = members[j]
                    meta = {**m.meta, "seconds": m.seconds + share}
                    checkpointing.save(m.directory, epoch + 1, host[j], meta)
                    last_save[j] = time.perf_counter()
    bar.close()
    jax.block_until_ready(state)
    host = engine.unstack(state, real)
    share, compile_share = timer.seconds / real, timer.compile_seconds / real
    return [
        (_variables(host[j]), _info(m, config, share, compile_share)) for j, m in enumerate(members)
    ]


def _shows(progress: bool) -> bool:
    """Progress bars: on process 0 only, which reports for the whole job."""
    return progress and jax.process_index() == 0


def _put(stacked: np.ndarray, j: int, value) -> np.ndarray:
    out = np.array(stacked)
    out[j] = np.asarray(value)
    return out


def _abstract(tree):
    """Restore target on this process's first device (every process restores every member)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def _info(m: _Member, config: TrainConfig, seconds: float, compile_seconds: float) -> dict:
    return {
        "epochs_run": config.epochs - m.start,
        "resumed_from": m.start,
        "losses": m.losses,
        "seconds": m.seconds + seconds,
        "compile_seconds": compile_seconds,
    }


def train_model(
    model: nn.Module,
    variables: dict,
    *,
    data: DeviceData,
    items: np.ndarray,
    config: TrainConfig,
    seed: int,
    checkpoint_dir: str | Path | None = None,
    meta: dict | None = None,
    **kwargs,
) -> tuple[dict, dict]:
    """`train_population` with one member: returns `(variables, info)`."""
    ((out, info),) = train_population(
        model,
        [variables],
        data=data,
        items=[items],
        seeds=[seed],
        config=config,
        checkpoint_dirs=[checkpoint_dir],
        metas=[meta],
        **kwargs,
    )
    return out, info


def _variables(state) -> dict:
    """`{'params', 'batch_stats'}` of a training or unlearning state (stacked or not)."""
    return {"params": state.params, "batch_stats": state.batch_stats}


state_variables = _variables
