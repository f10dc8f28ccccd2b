"""The one wave runner: every phase of a study (training, retraining, relearning and every
unlearning method's stages) runs its members through `run`.

A phase is a `Phase`: one or more `Stage`s (a program, a per-member plan of each epoch, a
number of epochs), how a wave's per-member device data is built, and the hooks phases differ
in (`on_chunk`, e.g. the relearning curves; checkpoints at epoch ends where a member has a
directory). `run` places the phase (`engine.place`), runs it in waves of one shape on the loop
engine (`camu_jax.engine`), and for every member:

* checks the losses and the state after every chunk: a non-finite member raises
  FloatingPointError naming it, its phase and step (`on_divergence="raise"`) or is recorded as
  diverged while the others go on unchanged (`"record"`); nothing non-finite is saved;
* saves its state at the end of an epoch (every `checkpoint_every` seconds, and after its last
  epoch) when it has a checkpoint directory, and resumes from the last saved epoch after a
  kill, bit-identically (plans are fixed functions of (member, epoch), and a restored state
  continues where it stopped): a member restored at stage k waits, inactive, through the
  earlier stages, and its state is put in place when stage k starts;
* restores a finished member without running it;
* logs every step's losses and learning rates (`camu_jax.logs`, inside `logs.log_to`) and keeps
  each epoch's means (`info["epochs"]`);
* measures each member's time apart from the others' (`_run_wave`): its compile seconds and
  its run seconds.

Times. Compiling is shared by the members of a phase: the phase's compile seconds (JAX's
compile events, from placing it to its last wave) are split equally among the members it ran.
Running is split by work: each chunk's wall time less what was compiled in it goes to the
members active in it, in proportion to the steps each ran there; a wave's other seconds
(building its member data, inits, checkpoints) are split equally among its members, and the
phase's others (timing probes of the placement) among all of its members. So a member's
`run_seconds` + `compile_seconds` add up, over the members, to the phase's wall time, and
members that ran more steps in a wave get more seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from camu_jax import checkpointing, engine, logs, sharding
from camu_jax.data.pipeline import DeviceData

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
    """One stage of a phase.

    key: identifies the program for the engine cache (everything `program` depends on but
      the mesh); program: `mesh -> engine.Program`; plan: `(member index, epoch) -> Plan` of
      `[steps, batch]` rows, a fixed function of its arguments (resume relies on it); epochs;
      chunk: steps per engine call (one chunk length per stage for every wave: a scan's
      length is part of its shape); learning_rates: `(member index, epoch) -> {name: rate}`
      for the step logs (None: none logged); a plan's `lr_scale` rows scale them per step.
    """

    name: str
    key: Hashable
    program: Callable[[Mesh], engine.Program]
    plan: Callable[[int, int], engine.Plan]
    epochs: int
    chunk: int
    learning_rates: Callable[[int, int], dict[str, float]] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
    """One run of a phase: its start `variables` (host), and where it is checkpointed
    (`directory`, None: nowhere) with `meta`, the JSON identity checked on restore."""

    name: str
    variables: PyTree
    directory: str | Path | None = None
    meta: dict | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Phase:
    """What `run` needs to know of a phase beyond its members.

    member_data: `(member indices of a wave, data on the wave's mesh) -> device tree` with a
      leading member axis (the indices repeat the first member for padding members).
    variables: `state -> {'params', 'batch_stats'}` of a stage's state (stacked or not).
    on_chunk: `on_chunk(stacked variables, done, members)` after every chunk: `done[j]` is how
      many steps of its epoch wave member `members[j]` (an index into the phase's members)
      has run.
    """

    name: str
    stages: tuple[Stage, ...]
    member_data: Callable[[Sequence[int], DeviceData], PyTree]
    variables: Callable[[PyTree], dict]
    on_chunk: Callable[[PyTree, np.ndarray, list[int]], None] | None = None
    checkpoint_every: float = 60.0
    on_divergence: str = "raise"
    use_scan: bool | None = None
    progress: bool = True

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    def position(self, done: int) -> tuple[int, int]:
        """`(stage, epochs of it done)` after `done` epochs of the phase; a stage's last epoch
        belongs to that stage (the state saved then is its state)."""
        offset = 0
        for k, s in enumerate(self.stages):
            if done <= offset + s.epochs and (done > offset or k == 0):
                return k, done - offset
            offset += s.epochs
        raise ValueError(f"{done} epochs done, but {self.name} has {self.total_epochs}")

    def where(self, k: int) -> str:
        return self.name if len(self.stages) == 1 else f"{self.name} {self.stages[k].name}"


# ------------------------------------------------------------------------------ engines

_ENGINES: OrderedDict = OrderedDict()
_MAX_ENGINES = 64


def engine_for(stage: Stage, mesh: Mesh, use_scan: bool | None) -> engine.Engine:
    """One engine (one set of jitted functions) per (program, mesh): every phase of a study
    with the same shapes reuses its compiled programs."""
    key = (stage.key, mesh, use_scan)
    if key in _ENGINES:
        _ENGINES.move_to_end(key)
        return _ENGINES[key]
    out = engine.Engine(stage.program(mesh), mesh, use_scan=use_scan)
    _ENGINES[key] = out
    while len(_ENGINES) > _MAX_ENGINES:
        _ENGINES.popitem(last=False)
    return out


# ------------------------------------------------------------------------------ members


def members(
    what: str,
    variables: Sequence[PyTree],
    names: Sequence[str] | None = None,
    checkpoint_dirs: Sequence[str | Path | None] | None = None,
    metas: Sequence[dict | None] | None = None,
    **per_member: Sequence,
) -> list[Member]:
    """A phase's members from per-member lists (default names `<what> <i>`, no checkpoints);
    raises ValueError naming the lists when they (or the other `per_member` lists: items,
    seeds, splits...) differ in length."""
    count = len(variables)
    names = list(names or [f"{what} {i}" for i in range(count)])
    dirs = list(checkpoint_dirs or [None] * count)
    metas = list(metas or [None] * count)
    lists = {"names": names, "checkpoint_dirs": dirs, "metas": metas, **per_member}
    if any(len(v) != count for v in lists.values()):
        sizes = ", ".join(f"{k} {len(v)}" for k, v in lists.items())
        raise ValueError(f"{what}: {count} members, but {sizes}: one entry per member")
    return [Member(n, v, d, m) for n, v, d, m in zip(names, variables, dirs, metas, strict=True)]


class _Run:
    """Bookkeeping of one member: where it starts (restored), its losses, steps, seconds."""

    def __init__(self, index: int, member: Member):
        self.index, self.member, self.name = index, member, member.name
        self.done = 0  # epochs of the phase already done (restored)
        self.state = None  # the restored state (host), when resuming
        self.steps, self.losses = 0, []
        self.epochs: list[dict] = []  # per-epoch means, earlier sessions' included
        # Earlier sessions' seconds included; `construct` is this session's.
        self.run_seconds, self.compile_seconds, self.construct = 0.0, 0.0, 0.0
        self.log: logs.MemberLog | None = None
        self.log_dir: Path | None = None

    def start(self, phase: Phase, k: int) -> int:
        """The first epoch of stage `k` this member runs (`epochs` when none)."""
        stage, done = phase.position(self.done)
        if k < stage:
            return phase.stages[k].epochs
        return done if k == stage else 0


@contextlib.contextmanager
def _locks(runs: list[_Run]):
    """`{member index: lock}`: one process at a time trains into a checkpoint directory, so
    a member that another run is training is waited for (saying so on stdout) and then
    restored. Taken in path order, so that two runs that share directories cannot each wait
    for the other; held until the phase ends. Process 0 writes every checkpoint and alone
    takes locks; the other processes read checkpoints once it holds them."""
    with contextlib.ExitStack() as held:
        locks, by_path = {}, {}
        if jax.process_index() == 0:
            dirs = {
                r.index: Path(r.member.directory).absolute()
                for r in runs
                if r.member.directory is not None
            }
            for i, path in sorted(dirs.items(), key=lambda item: str(item[1])):
                if path not in by_path:  # members with one directory share its lock
                    by_path[path] = held.enter_context(
                        checkpointing.lock_directory(path, wait=True)
                    )
                locks[i] = by_path[path]
        sharding.from_process_zero(np.zeros((), np.int32))  # a barrier
        yield locks


def _abstract(tree):
    """Restore target on this process's first device (every process restores every member)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def _restore(phase: Phase, r: _Run, mesh: Mesh) -> None:
    directory = r.member.directory
    if directory is None or checkpointing.latest_step(directory) is None:
        return
    # The latest step (a damaged one is refused, naming its folder, not skipped); one past the
    # phase's epochs (a run with more epochs saved there) restores as its last.
    k, _ = phase.position(min(checkpointing.latest_step(directory), phase.total_epochs))
    # The state's shape at the end of stage k: every stage's init from the variables.
    shape = r.member.variables
    for s in phase.stages[: k + 1]:
        shape = jax.eval_shape(s.program(mesh).init, shape)
    done, state, saved = checkpointing.restore(
        directory, abstract_state=_abstract(shape), expected_meta=r.member.meta or {}
    )
    r.done = min(done, phase.total_epochs)
    # Checkpoints saved before times were split hold the total `seconds` alone.
    r.compile_seconds = float(saved.get("compile_seconds", 0.0))
    r.run_seconds = float(saved.get("run_seconds", saved.get("seconds", 0.0) - r.compile_seconds))
    r.steps = int(saved.get("steps", 0))
    r.epochs = list(saved.get("epoch_means", []))
    r.state = jax.tree.map(np.asarray, state)


def _info(r: _Run, phase: Phase, why=None) -> dict:
    out = {
        "seconds": r.run_seconds + r.compile_seconds,
        "run_seconds": r.run_seconds,
        "compile_seconds": r.compile_seconds,
        "construct_seconds": r.construct,
        "epochs_run": phase.total_epochs - r.done,
        "resumed_from": r.done,
        "steps": r.steps,
        "losses": r.losses,
        "epochs": r.epochs,
        "log_dir": None if r.log_dir is None else str(r.log_dir),
    }
    if why is not None:
        out["diverged"] = why
    return out


def run(
    phase: Phase,
    members: Sequence[Member],
    data: DeviceData,
    *,
    population_size: int | None = None,
) -> list[tuple[dict | None, dict]]:
    """Runs every member of `phase` from its `variables`, at most `population_size` at a time
    (default: the layout `engine.place` chooses for the phase); returns per member
    `(variables, info)` (`variables` None for a member recorded as diverged).

    info: `seconds` (`run_seconds` + `compile_seconds`: the member's measured share of the
    phase's time, module docstring; earlier sessions' included), `construct_seconds`
    (its share of building its wave's member data), `epochs_run`, `resumed_from` (epochs
    restored from its checkpoint), `steps` (of the whole phase), `losses` (per chunk means,
    with the stage), `epochs` (per-epoch means of every metric and learning rate, with the
    stage and the steps), `log_dir` (its step logs, `camu_jax.logs`; None when off), and
    `diverged` (the message) for a member whose loss or state turned non-finite under
    `on_divergence="record"`.
    """
    if phase.on_divergence not in ("raise", "record"):
        raise ValueError(f"on_divergence must be 'raise' or 'record', got {phase.on_divergence!r}")
    runs = [_Run(i, m) for i, m in enumerate(members)]
    results: list = [None] * len(runs)
    with _locks(runs) as locks:
        for r in runs:
            _restore(phase, r, data.mesh)
        # Processes that resumed from different epochs would run different programs and wait
        # on each other forever.
        sharding.agree(
            [r.done for r in runs],
            f"the epochs already done by the {phase.name} models (read from their checkpoints)",
            "checkpoints must be on a filesystem that every host shares",
        )
        pending = []
        for r in runs:
            if r.done >= phase.total_epochs:
                where = logs.member_folder(phase.name, r.name)
                r.log_dir = where if where is not None and where.is_dir() else None
                results[r.index] = (phase.variables(r.state), _info(r, phase))
                if r.index in locks:  # restored: another run may have it now
                    locks[r.index].release()
            else:
                pending.append(r)
        if not pending:
            return results

        def engines_on(mesh):
            return [engine_for(s, mesh, phase.use_scan) for s in phase.stages]

        def probe(mesh, size, timed):
            return _probe(phase, engines_on(mesh), pending, data.on(mesh), size, timed)

        timer = engine.Timer()
        steps = _timed_steps(phase, pending)
        placement = engine.place(
            population_size, len(pending), data.mesh, probe, steps=steps, what=phase.name
        )
        data = data.on(placement.mesh)
        engines = engines_on(data.mesh)
        counted = 0.0  # seconds the waves gave their members (compiling apart)
        compile_before = {id(r): r.compile_seconds for r in pending}
        outs = {}
        for wave in engine.waves(len(pending), placement.size):
            wave_runs = [pending[i] for i in wave]
            out, seconds = _run_wave(phase, engines, wave_runs, placement.size, data)
            outs.update(zip((r.index for r in wave_runs), out, strict=True))
            counted += seconds
        # The phase's compiling, split equally; its time outside the waves' (placement
        # probes), too.
        compile_s, wall = timer.compile_seconds, timer.seconds
        rest = max(0.0, wall - compile_s - counted)
        for r in pending:
            r.compile_seconds = compile_before[id(r)] + compile_s / len(pending)
            r.run_seconds += rest / len(pending)
        for r in pending:
            variables, why = outs[r.index]
            results[r.index] = (variables, _info(r, phase, why))
    return results


def _steps(plan: engine.Plan) -> int:
    return len(next(iter(plan.values())))


def _remaining_steps(phase: Phase, r: _Run) -> int:
    """The member's steps still to run (each epoch counted as long as its first)."""
    return sum(
        max(0, s.epochs - r.start(phase, k)) * _steps(s.plan(r.index, 0))
        for k, s in enumerate(phase.stages)
    )


def _put(stacked: np.ndarray, j: int, value) -> np.ndarray:
    out = np.array(stacked)
    out[j] = np.asarray(value)
    return out


def _with_restored(state, runs: list[_Run], phase: Phase, k: int, mesh: Mesh):
    """The wave's state of stage `k` with the states of the members restored inside stage k
    put in place."""
    restored = [(j, r) for j, r in enumerate(runs) if r.state is not None]
    restored = [(j, r) for j, r in restored if phase.position(r.done)[0] == k]
    if not restored:
        return state
    host = sharding.fetch(state)
    for j, r in restored:
        host = jax.tree.map(lambda h, v, j=j: _put(h, j, v), host, r.state)
    return sharding.shard_members(host, mesh)


def _wave_plan(phase: Phase, k: int, runs: list[_Run], size: int, epoch: int) -> engine.Plan:
    """The wave's `[size, steps, batch]` plan of one epoch of stage k, padded to its chunk
    (padding members and members not at this epoch inactive)."""
    stage = phase.stages[k]
    plans = []
    for j, r in enumerate(engine.pad_members(runs, size)):
        plan = stage.plan(r.index, epoch)
        if j >= len(runs) or epoch < r.start(phase, k):
            plan = {key: np.zeros_like(v) for key, v in plan.items()}
        plans.append(plan)
    return engine.pad_steps(engine.stack_plans(plans), stage.chunk)


# Seconds the member-data programs of a phase's wave took to compile, by (phase name, members
# per wave, member devices): what `_probe` adds to a layout's compile cost where those programs
# were compiled before (by `compile_ahead`'s thread), when building them again costs nothing.
_DATA_COMPILE: dict[tuple[str, int, int], float] = {}


def _probe(phase: Phase, engines, pending: list[_Run], data: DeviceData, size: int, timed: bool):
    """`engine.place`'s probe: bytes per member of a wave of the first `size` members (padded,
    all active) at the first stage it runs, with `timed` the seconds of one of its steps (on a
    throwaway state) and its program's compile seconds, and the seconds building the wave's
    member data took (without compiling). The compile seconds count the wave's member-data
    programs (the teachers' forward passes...) with its step: a layout tried anew compiles
    both. Where the member data's programs were compiled before (ahead, in another thread),
    their seconds then are used (`_DATA_COMPILE`)."""
    runs = engine.pad_members(pending[:size], size)
    timer = engine.Timer()
    member = phase.member_data([r.index for r in runs], data)
    jax.block_until_ready(member)
    construct = timer.seconds - timer.compile_seconds  # a wave's fixed cost, compiling apart
    key = (phase.name, size, sharding.member_devices(data.mesh))
    if timer.compile_seconds > _DATA_COMPILE.get(key, 0.0):
        _DATA_COMPILE[key] = timer.compile_seconds
    data_compile = _DATA_COMPILE.get(key, 0.0)
    k = min(phase.position(r.done)[0] for r in pending[:size])
    state = engine.stack([r.member.variables for r in runs])
    for e in engines[: k + 1]:
        state = e.init(state)
    stage = phase.stages[k]
    epoch = min(r.start(phase, k) for r in pending[:size])
    plan = engine.stack_plans([stage.plan(r.index, epoch) for r in runs])
    part = {key: v[:, : stage.chunk] for key, v in engine.pad_steps(plan, stage.chunk).items()}
    shared = (data.images, data.labels)
    need = engines[k].memory_per_member(state, shared, member, part)
    if not timed:
        return need, None, 0.0, construct
    step_s, compile_s = engines[k].step_seconds(state, shared, member, part)
    return need, step_s, compile_s + data_compile, construct


def _timed_steps(phase: Phase, runs) -> int | None:
    """The member-steps `engine.place` weighs layouts by, or None where every call runs a
    whole scanned chunk by rule (accelerators, or `use_scan=True`: nothing is timed, the
    layout comes from memory alone). On CPU a probe times a step, or a scanned chunk."""
    scans = engine.default_use_scan() if phase.use_scan is None else phase.use_scan
    return None if scans else sum(_remaining_steps(phase, r) for r in runs)


def compile_ahead(
    phase: Phase,
    members: Sequence[Member],
    data: DeviceData,
    *,
    population_size: int | None = None,
) -> dict:
    """Compiles every program `run` will run for this phase (each stage's state init and
    step, for the placement it will choose) without running a step; returns what it compiled
    (`{'seconds', **Timer.compile_record()}` of the calling thread's compile scope).

    Meant for a thread started before the phase (`engine.compile_scope`): the members'
    variables may be stand-ins of the right shapes and dtypes (initial variables: the models
    the phase starts from need not exist yet), since programs depend on shapes only; the
    phase then finds its programs compiled. The placement is chosen as `run` chooses it but
    without timed probes (timings taken beside a running phase mean nothing): where `run`
    times its probe (a CPU) it may choose another layout, and compile that; on accelerators
    (untimed) it chooses this one."""
    timer = engine.Timer()
    runs = [_Run(i, m) for i, m in enumerate(members)]

    def engines_on(mesh):
        return [engine_for(s, mesh, phase.use_scan) for s in phase.stages]

    def probe(mesh, size, timed):
        return _probe(phase, engines_on(mesh), runs, data.on(mesh), size, False)

    placement = engine.place(
        population_size,
        len(runs),
        data.mesh,
        probe,
        steps=_timed_steps(phase, runs),
        log=None,
        what=phase.name,
        record=False,
        ahead=True,
    )
    placed = data.on(placement.mesh)
    engines = engines_on(placed.mesh)
    wave = engine.pad_members(runs[: placement.size], placement.size)
    member = phase.member_data([r.index for r in wave], placed)
    state = engine.stack([r.member.variables for r in wave])
    shared = (placed.images, placed.labels)
    for stage, e in zip(phase.stages, engines, strict=True):
        state = e.init(state)
        plan = engine.stack_plans([stage.plan(r.index, 0) for r in wave])
        part = {key: v[:, : stage.chunk] for key, v in engine.pad_steps(plan, stage.chunk).items()}
        e.compile(state, shared, member, part)
    return {"seconds": timer.seconds, **timer.compile_record()}


def _shows(progress: bool) -> bool:
    """Progress bars: on process 0 only, which reports for the whole job."""
    return progress and jax.process_index() == 0


def _run_wave(
    phase: Phase, engines, runs: list[_Run], size: int, data: DeviceData
) -> tuple[list, float]:
    """Runs one wave; returns per member `(variables or None, why it diverged or None)`, and
    the seconds it gave its members' `run_seconds` (its wall time less its compiling, which
    `run` splits over the phase)."""
    timer = engine.Timer()
    for r in runs:
        r.log_dir = None
        if jax.process_index() == 0 and (where := logs.member_folder(phase.name, r.name)):
            r.log_dir, r.log = where, logs.MemberLog(where, resume_step=r.steps)
    try:
        return _run_wave_logged(phase, engines, runs, size, data, timer)
    finally:
        for r in runs:
            if r.log is not None:
                r.log.close()
                r.log = None


def _metric_rows(part: engine.Plan, count: int) -> np.ndarray:
    """The plan rows of a chunk's `count` metric rows: every row where a call runs a scanned
    chunk; the rows where some member has a real example (the ones the per-step loop runs,
    `engine.Engine.__call__`) otherwise."""
    rows = next(iter(part.values())).shape[1]
    if count == rows:
        return np.arange(rows)
    masks = [
        np.asarray(v).reshape(v.shape[0], v.shape[1], -1) for k, v in part.items() if "mask" in k
    ]
    return np.flatnonzero(np.any([m.any(axis=(0, 2)) for m in masks], axis=0))


def _rates(stage: Stage, r: _Run, epoch: int, part, j: int, rows: np.ndarray) -> dict:
    """`{name: [n]}`: member `r`'s learning rates at the plan rows `rows` of its chunk."""
    if stage.learning_rates is None:
        return {}
    base = stage.learning_rates(r.index, epoch)
    scale = (
        np.asarray(part["lr_scale"])[j, rows].reshape(len(rows), -1)[:, 0].astype(np.float64)
        if "lr_scale" in part
        else np.ones(len(rows))
    )
    return {name: rate * scale for name, rate in base.items()}


def _run_wave_logged(phase: Phase, engines, runs, size, data, timer) -> tuple[list, float]:
    real = len(runs)
    padded = engine.pad_members(runs, size)
    member = phase.member_data([r.index for r in padded], data)
    jax.block_until_ready(member)
    for r in runs:
        r.construct += timer.seconds / real
    shared = (data.images, data.labels)
    names = [r.name for r in runs]
    state = engine.stack([r.member.variables for r in padded])
    diverged: dict[int, str] = {}
    last_save = [time.perf_counter()] * real
    offset = 0
    chunks = 0.0  # the chunks' seconds, compiling apart, given to the members that ran them
    saving = any(r.member.directory is not None for r in runs)
    for k, (stage, run_) in enumerate(zip(phase.stages, engines, strict=True)):
        if len(diverged) == real:
            break  # nothing left to compute
        where = phase.where(k)
        state = _with_restored(run_.init(state), runs, phase, k, data.mesh)
        first = min(r.start(phase, k) for r in runs)
        total = sum(
            max(0, stage.epochs - r.start(phase, k)) * _steps(stage.plan(r.index, 0)) for r in runs
        )
        bar = tqdm(
            total=total, desc=where, unit="step", disable=not _shows(phase.progress), leave=False
        )
        for epoch in range(first, stage.epochs):
            plan = _wave_plan(phase, k, runs, size, epoch)
            lengths = [
                _steps(stage.plan(r.index, epoch)) if epoch >= r.start(phase, k) else 0
                for r in runs
            ]
            means = [logs.EpochMeans() for _ in runs]
            for lo in range(0, plan[next(iter(plan))].shape[1], stage.chunk):
                part = {key: v[:, lo : lo + stage.chunk] for key, v in plan.items()}
                t, compiled = time.perf_counter(), timer.compile_seconds
                state, metrics = run_(state, shared, member, part)  # waits: host metrics
                seconds = time.perf_counter() - t - (timer.compile_seconds - compiled)
                bad = engine.nonfinite_members(
                    metrics, names, f"{where} epoch {epoch + 1}", state, skip=diverged
                )
                if bad and phase.on_divergence == "raise":
                    raise FloatingPointError(bad[min(bad)])
                diverged.update(bad)
                active = np.asarray(metrics["active"], bool)[:, :real]
                keys = [key for key in metrics if key not in ("finite", "active", "state_finite")]
                rows = _metric_rows(part, active.shape[0])
                if active.any():
                    chunks += seconds
                for j, r in enumerate(runs):
                    ran = active[:, j]
                    r.steps += int(ran.sum())
                    r.run_seconds += seconds * ran.sum() / max(1, active.sum())
                    if j in diverged or not ran.any():
                        continue
                    r.losses.append({"stage": stage.name, **engine.chunk_means(metrics, keys, j)})
                    values = {key: np.asarray(metrics[key])[ran, j] for key in keys}
                    values.update(_rates(stage, r, epoch, part, j, rows[ran]))
                    means[j].add(values)
                    if r.log is not None:
                        steps = np.arange(r.steps - int(ran.sum()), r.steps) + 1
                        r.log.write(stage.name, epoch + 1, steps, values)
                bar.update(int(active.sum()))
                if phase.on_chunk is not None:
                    done = np.asarray([min(lo + stage.chunk, n) for n in lengths])
                    phase.on_chunk(phase.variables(state), done, [r.index for r in runs])
            for j, r in enumerate(runs):
                if j not in diverged and (record := means[j].record(stage.name, epoch + 1)):
                    r.epochs.append(record)
            if saving:
                _save_due(
                    phase, runs, state, offset + epoch + 1, k, epoch, diverged, timer, last_save
                )
        bar.close()
        offset += stage.epochs
    host = engine.unstack(phase.variables(state), real)
    # The wave's other seconds (member data, inits, saves, unstacking), split equally.
    counted = timer.seconds - timer.compile_seconds
    for r in runs:
        r.run_seconds += max(0.0, counted - chunks) / real
    out = [(None if j in diverged else host[j], diverged.get(j)) for j in range(real)]
    return out, counted


def _save_due(phase, runs, state, step, k, epoch, diverged, timer, last_save) -> None:
    """Saves, at the end of epoch `epoch` of stage `k` (`step` epochs of the phase done), the
    members whose `checkpoint_every` seconds have passed since their last save, and every
    member after its last epoch; never a diverged member, nor one that did not run this
    epoch."""
    now = time.perf_counter()
    due = [
        r.member.directory is not None
        and j not in diverged
        and epoch >= r.start(phase, k)
        and (step == phase.total_epochs or now - last_save[j] >= phase.checkpoint_every)
        for j, r in enumerate(runs)
    ]
    # Clocks differ between processes; saving gathers the state (a collective), so process
    # 0's decision is everyone's.
    due = np.flatnonzero(sharding.from_process_zero(np.asarray(due, np.int32)))
    if not len(due):
        return
    host = engine.unstack(state, len(runs))
    # What a resumed member starts from: its seconds so far (the wave's compiling split
    # equally among its members, as `run` will split the phase's), steps and epoch means.
    compile_share = timer.compile_seconds / len(runs)
    for j in due:
        r = runs[j]
        meta = {
            **(r.member.meta or {}),
            "seconds": r.run_seconds + r.compile_seconds + compile_share,
            "run_seconds": r.run_seconds,
            "compile_seconds": r.compile_seconds + compile_share,
            "steps": r.steps,
            "epoch_means": r.epochs,  # not "epochs": an identity key of the trained models
        }
        checkpointing.save(r.member.directory, step, host[j], meta)
        last_save[j] = time.perf_counter()
