"""The unlearning-method interface, and the runner that runs any method as a population.

A method is a small frozen config (a dataclass) plus pure pieces the loop engine runs:

* `member_arrays(ctx)`: host arrays of one run (counterfactual labels, random labels...);
  keys starting `f_` / `r_` / `s_` hold one entry per forget / remain / sample item and reach
  each step's batch gathered by that stream's ids; other keys stay member-level.
* `prepare(...)`: device arrays computed once per wave from the frozen originals (teacher
  embeddings, saliency masks, Fisher information...).
* `stages()`: one or more `Stage`s, each a `Program` (state init, step, batch) run for some
  epochs over plans drawn per (seed, epoch); a stage's state initialises from the previous
  stage's (the first from the original model's variables).

`run_population` runs every member (one per seed x forget set) of a method through the engine:
vmapped members, sharded over the mesh, waves of one shape, one compile per stage.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh
from tqdm.auto import tqdm

from camu_jax import checks, engine, sharding
from camu_jax.data.pipeline import DeviceData, InputSpec, item_keys, preprocess, shuffled_batches
from camu_jax.data.splits import Splits

PyTree = Any
STREAMS = {"f": "forget", "r": "remain", "s": "sample"}
# Per-run arrays are padded to multiples of this, so runs of similar sizes share programs.
WIDTH_QUANTUM = 512


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a method: `program(model, spec, mesh)` builds its `engine.Program`;
    `plan(ctx, epoch)` draws one member's `[steps, batch]` rows of an epoch; `epochs`."""

    name: str
    program: Callable[[nn.Module, InputSpec, Mesh], engine.Program]
    plan: Callable[[MemberContext, int], engine.Plan]
    epochs: int


@dataclasses.dataclass(frozen=True, eq=False)
class MemberContext:
    """What a method knows of one run (host side)."""

    seed: int
    splits: Splits
    labels: np.ndarray  # all training labels
    num_classes: int
    widths: dict[str, int]  # phase-wide padded widths of the forget, remain, sample streams

    @functools.cached_property
    def forget(self) -> np.ndarray:
        """D_f rows, repeated `splits.repeat` times (CIFAR-100 class removal)."""
        return np.tile(self.splits.forget, self.splits.repeat).astype(np.int32)

    @property
    def remain(self) -> np.ndarray:
        return self.splits.remain.astype(np.int32)

    @property
    def sample(self) -> np.ndarray:
        return self.splits.sample.astype(np.int32)

    def rng(self, *tag: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *tag])

    def pad(self, array: np.ndarray, stream: str) -> np.ndarray:
        """`array` (one entry per item of `stream`) padded to the phase width."""
        out = np.zeros((self.widths[stream], *array.shape[1:]), array.dtype)
        out[: len(array)] = array
        return out


class Method:
    """Base of unlearning methods: subclasses are frozen dataclasses with a `name`, a
    `batch_size` field, and `stages()`; see the module docstring."""

    name: ClassVar[str]
    batch_size: int
    fixed_augment: ClassVar[tuple[str, ...]] = ()  # streams augmented once per item

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting."""
        from camu_jax.steps import check_number

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            integer = f.type in ("int", int)
            # Zero is a valid weight or rate for some settings: those say so in `_nonneg`.
            check_number(
                f"{self.name} {f.name}",
                value,
                integer=integer,
                positive=f.name not in self._nonneg(),
            )

    def _nonneg(self) -> tuple[str, ...]:
        return ("weight_decay", "momentum")

    def member_arrays(self, ctx: MemberContext) -> dict[str, np.ndarray]:
        return {}

    def prepare(self, model, originals, data: DeviceData, host: dict) -> dict:
        """Device arrays of the wave computed once from the frozen `originals` (stacked, on
        device) and the wave's stacked host arrays `host` (rows, keys, `member_arrays`)."""
        return {}

    def stages(self) -> tuple[Stage, ...]:
        raise NotImplementedError

    def variables(self, state) -> dict:
        return {"params": state.params, "batch_stats": state.batch_stats}


# ------------------------------------------------------------------------------ batches


def member_keys(seed: int) -> dict[str, np.ndarray]:
    """A run's keys (as key data): counterfactual noise, fixed augmentations, step keys."""
    noise, aug, step = jax.random.split(jax.random.key(seed), 3)
    return {
        f"{k}_key": np.asarray(jax.random.key_data(v))
        for k, v in zip(("noise", "aug", "step"), (noise, aug, step), strict=True)
    }


def stream_batch(method: Method, spec: InputSpec, mesh: Mesh):
    """`make_batch` for the engine: for every stream in the plan row (`f_ids`/`f_mask`,
    `r_ids`/`r_mask`, `s_ids`/`s_mask`), `batch[stream]` holds `x` (preprocessed inputs),
    `y`, `mask`, `ids`, and the member's per-item arrays of that stream (`f_*` -> forget...),
    gathered by ids. Streams in `method.fixed_augment` get one augmentation per item; the
    others a fresh one every step. Other row entries pass through as `batch[name]`."""

    def make_batch(state, shared, member, row):
        images, labels = shared
        batch = {}
        for p, stream in STREAMS.items():
            if f"{p}_ids" not in row:
                continue
            ids = row[f"{p}_ids"]
            rows = member[f"{stream}_rows"][ids]
            keys = None
            if spec.augment:
                if stream in method.fixed_augment:
                    key = jax.random.wrap_key_data(member["aug_key"])
                else:
                    key = jax.random.fold_in(
                        jax.random.wrap_key_data(member["step_key"]),
                        state.step * 3 + "frs".index(p),
                    )
                keys = item_keys(key, ids)
            part = {
                "x": preprocess(images[rows], spec, augment_keys=keys),
                "y": labels[rows],
                "mask": row[f"{p}_mask"],
                "ids": ids,
            }
            for k, v in member.items():
                if k.startswith(f"{p}_"):
                    part[k[2:]] = v[ids]
            batch[stream] = sharding.constrain_batch(part, mesh)
        for k, v in row.items():
            if k[:2] not in ("f_", "r_", "s_"):
                batch[k] = v
        return batch

    return make_batch


# ------------------------------------------------------------------------------ plans


def zip_plan(ctx: MemberContext, epoch: int, a: str, b: str, batch_size: int, tag: int = 4):
    """The reference's `zip` of two shuffled loaders over streams `a` and `b` (stops at the
    shorter): CaMU's D_f/D_s pairing."""
    rng = ctx.rng(tag, epoch)
    a_ids, a_mask = shuffled_batches(len(getattr(ctx, STREAMS[a])), batch_size, rng)
    b_ids, b_mask = shuffled_batches(len(getattr(ctx, STREAMS[b])), batch_size, rng)
    steps = min(len(a_ids), len(b_ids))
    return {
        f"{a}_ids": a_ids[:steps],
        f"{a}_mask": a_mask[:steps],
        f"{b}_ids": b_ids[:steps],
        f"{b}_mask": b_mask[:steps],
    }


def epoch_plan(
    ctx: MemberContext,
    epoch: int,
    driver: str,
    batch_size: int,
    *,
    also: Sequence[str] = (),
    tag: int = 7,
    steps: int | None = None,
):
    """One epoch over stream `driver` (shuffled, every item once), with full batches of the
    streams in `also` drawn alongside (cycled shuffles, so every step has them); `steps`
    caps the epoch (e.g. a fraction of D_r)."""
    rng = ctx.rng(tag, epoch)
    ids, mask = shuffled_batches(len(getattr(ctx, STREAMS[driver])), batch_size, rng)
    if steps is not None:
        ids, mask = ids[:steps], mask[:steps]
    plan = {f"{driver}_ids": ids, f"{driver}_mask": mask}
    for p in also:
        n = len(getattr(ctx, STREAMS[p]))
        reps = -(-(len(ids) * batch_size) // n)
        order = np.concatenate([rng.permutation(n) for _ in range(reps)])[: len(ids) * batch_size]
        plan[f"{p}_ids"] = order.reshape(len(ids), batch_size).astype(np.int32)
        plan[f"{p}_mask"] = np.ones((len(ids), batch_size), np.float32)
    return plan


# ------------------------------------------------------------------------------ runner


@functools.lru_cache(maxsize=64)
def _engine(method: Method, index: int, model, spec, mesh, use_scan) -> engine.Engine:
    # One engine per (method config, stage): a study's waves reuse its compiled programs.
    return engine.Engine(method.stages()[index].program(model, spec, mesh), mesh, use_scan=use_scan)


def _widths(splits: Sequence[Splits]) -> dict[str, int]:
    def quantum(n):
        return max(WIDTH_QUANTUM, -(-n // WIDTH_QUANTUM) * WIDTH_QUANTUM)

    return {
        "forget": quantum(max(s.forget.size * s.repeat for s in splits)),
        "remain": quantum(max(s.remain.size for s in splits)),
        "sample": quantum(max(s.sample.size for s in splits)),
    }


def run_population(
    method: Method,
    model: nn.Module,
    originals: Sequence[dict],
    *,
    data: DeviceData,
    splits: Sequence[Splits],
    seeds: Sequence[int],
    num_classes: int,
    names: Sequence[str] | None = None,
    population_size: int | None = None,
    chunk_steps: int = 250,
    use_scan: bool | None = None,
    progress: bool = True,
    on_divergence: str = "raise",
) -> list[tuple[dict, dict]]:
    """Runs `method` from every frozen original `originals[i]` on `splits[i]`, `seeds[i]`, at
    most `population_size` members at a time (default: the layout `engine.place` chooses for
    the phase); returns per member `(variables, info)`.

    info: `seconds` (the member's share of its wave's wall time: preparation + unlearning,
    compile included, the reference's "time"), `construct_seconds` (preparation),
    `compile_seconds`, `losses` (per chunk means), `steps`.

    A member whose loss or parameters turn non-finite: `on_divergence="raise"` raises
    FloatingPointError naming it, its phase and step; `"record"` gives it `variables=None` and
    the message as `info["diverged"]`, and the other members go on unchanged (members never
    mix: their results are those of a population without the diverged one).
    """
    if on_divergence not in ("raise", "record"):
        raise ValueError(f"on_divergence must be 'raise' or 'record', got {on_divergence!r}")
    method.validate()
    checks.check_splits(splits, data)
    checks.check_labels(data, num_classes)
    checks.check_model_classes(model, ("data", data), num_classes=num_classes)
    sharding.check_batch_size(method.batch_size, data.mesh)
    count = len(originals)
    names = list(names or [f"{method.name} {i}" for i in range(count)])
    if not (len(splits) == len(seeds) == len(names) == count):
        raise ValueError("originals, splits, seeds and names differ in length")
    widths = _widths(splits)
    ctxs = [
        MemberContext(s, sp, data.host_labels, num_classes, widths)
        for s, sp in zip(seeds, splits, strict=True)
    ]
    stages = method.stages()
    # One chunk length per stage for every wave (a scan's length is part of its shape).
    chunks = [
        max(1, min(chunk_steps, max(len(next(iter(st.plan(c, 0).values()))) for c in ctxs)))
        for st in stages
    ]

    def engines_on(mesh):
        return [_engine(method, i, model, data.spec, mesh, use_scan) for i in range(len(stages))]

    def probe(mesh, size, timed):
        return _probe(
            method, model, engines_on(mesh), chunks, originals, data.on(mesh), ctxs, size, timed
        )

    steps = sum(st.epochs * len(next(iter(st.plan(c, 0).values()))) for st in stages for c in ctxs)
    placement = engine.place(
        population_size, count, data.mesh, probe, steps=steps, what=method.name
    )
    data = data.on(placement.mesh)
    engines = engines_on(data.mesh)
    size = placement.size
    results: list = [None] * count
    for wave in engine.waves(count, size):
        outs = _run_wave(
            method,
            model,
            engines,
            chunks,
            [originals[i] for i in wave],
            data,
            [ctxs[i] for i in wave],
            [names[i] for i in wave],
            size,
            progress,
            on_divergence,
        )
        for i, out in zip(wave, outs, strict=True):
            results[i] = out
    return results


def _stack(trees):
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _member_data(method, model, originals, data, ctxs):
    """A wave's member data on device: rows, keys, `member_arrays`, then `prepare`'s."""
    host = []
    for c in ctxs:
        arrays = {
            "forget_rows": c.pad(c.forget, "forget"),
            "remain_rows": c.pad(c.remain, "remain"),
            "sample_rows": c.pad(c.sample, "sample"),
            **member_keys(c.seed),
        }
        for k, v in method.member_arrays(c).items():
            arrays[k] = c.pad(v, STREAMS[k[0]]) if k[:2] in ("f_", "r_", "s_") else v
        host.append(arrays)
    host = _stack(host)
    member = sharding.shard_members(host, data.mesh)
    teachers = sharding.shard_members(_stack(originals), data.mesh)
    member.update(method.prepare(model, teachers, data, host))
    return member


def _probe(method, model, engines, chunks, originals, data, ctxs, size, timed):
    """`engine.place`'s probe: bytes per member of the first stage of a wave of the first
    `size` members (padded), and with `timed` the seconds of one of its steps."""
    pad = functools.partial(engine.pad_members, size=size)
    wave_ctxs = pad(ctxs[:size])
    member = _member_data(method, model, pad(originals[:size]), data, wave_ctxs)
    state = engines[0].init(_stack(pad(originals[:size])))
    stage = method.stages()[0]
    plan = engine.stack_plans([stage.plan(c, 0) for c in wave_ctxs])
    part = {k: v[:, : chunks[0]] for k, v in engine.pad_steps(plan, chunks[0]).items()}
    shared = (data.images, data.labels)
    need = engines[0].memory_per_member(state, shared, member, part)
    if not timed:
        return need, None, 0.0
    return need, *engines[0].step_seconds(state, shared, member, part)


def _run_wave(
    method, model, engines, chunks, originals, data, ctxs, names, size, progress, on_divergence
):
    timer = engine.Timer()
    real = len(originals)
    pad = functools.partial(engine.pad_members, size=size)
    originals, ctxs, names = pad(originals), pad(ctxs), pad(names)
    member = _member_data(method, model, originals, data, ctxs)
    jax.block_until_ready(member)
    construct_seconds = timer.seconds

    shared = (data.images, data.labels)
    state = _stack(originals)
    losses = [[] for _ in range(real)]
    steps = [0] * real
    diverged: dict[int, str] = {}
    stages = method.stages()
    for stage, run, chunk in zip(stages, engines, chunks, strict=True):
        if len(diverged) == real:
            break  # nothing left to compute
        where = method.name if len(stages) == 1 else f"{method.name} {stage.name}"
        state = run.init(state)
        plans_0 = [stage.plan(c, 0) for c in ctxs[:real]]
        total = stage.epochs * sum(len(next(iter(p.values()))) for p in plans_0)
        bar = tqdm(
            total=total,
            desc=f"{method.name} {stage.name}",
            unit="step",
            disable=not progress or jax.process_index() != 0,  # process 0 reports
            leave=False,
        )
        for epoch in range(stage.epochs):
            plans = []
            for j, c in enumerate(ctxs):
                plan = stage.plan(c, epoch)
                if j >= real:
                    plan = {k: np.zeros_like(v) for k, v in plan.items()}
                else:
                    steps[j] += len(next(iter(plan.values())))
                plans.append(plan)
            plan = engine.pad_steps(engine.stack_plans(plans), chunk)
            for lo in range(0, next(iter(plan.values())).shape[1], chunk):
                part = {k: v[:, lo : lo + chunk] for k, v in plan.items()}
                state, metrics = run(state, shared, member, part)
                bad = engine.nonfinite_members(
                    metrics, names[:real], f"{where} epoch {epoch + 1}", state, skip=diverged
                )
                if bad and on_divergence == "raise":
                    raise FloatingPointError(bad[min(bad)])
                diverged.update(bad)
                keys = [k for k in metrics if k not in ("finite", "active", "state_finite")]
                for j in (j for j in range(real) if j not in diverged):
                    means = engine.chunk_means(metrics, keys, j)
                    if means:
                        losses[j].append({"stage": stage.name, **means})
                bar.update(int(np.asarray(metrics["active"], bool)[:, :real].sum()))
        bar.close()
    out = engine.unstack(method.variables(state), real)
    share = timer.seconds / real
    return [
        (
            None if j in diverged else out[j],
            {
                "seconds": share,
                "construct_seconds": construct_seconds / real,
                "compile_seconds": timer.compile_seconds / real,
                "steps": steps[j],
                "losses": losses[j],
                **({"diverged": diverged[j]} if j in diverged else {}),
            },
        )
        for j in range(real)
    ]
