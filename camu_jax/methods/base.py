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
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from camu_jax import checks, engine, logs, runner, sharding
from camu_jax import keys as host_keys
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
    title: ClassVar[str]  # display title in tables and plots (`camu_jax.results.method_title`)
    batch_size: int
    fixed_augment: ClassVar[tuple[str, ...]] = ()  # streams augmented once per item
    # Settings as data: every float setting (learning rates, weight decay, momentum, loss
    # coefficients, temperatures, noise scales...) enters the method's programs as per-member
    # data (`settings(batch)` in a step, `host["settings"]` in `prepare`), not a constant, so
    # one program serves every value and the members of one population may differ in them.
    # Settings that fix shapes or the program's structure (int fields: batch sizes, epochs,
    # step counts; and the float fields named here) stay constants of the program.
    static_settings: ClassVar[tuple[str, ...]] = ()
    # False for a method whose programs still read its float settings as constants (then
    # every value compiles its own programs, and its population members share one value).
    settings_as_data: ClassVar[bool] = False

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting."""
        from camu_jax.steps import check_number

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):  # e.g. SCRUB's lr_decay_epochs: each entry
                entries, integer = value, "int" in str(f.type)
            elif isinstance(value, bool) or not isinstance(value, int | float):
                continue
            else:
                entries, integer = (value,), f.type in ("int", int)
            for v in entries:
                if isinstance(v, bool) or not isinstance(v, int | float):
                    continue
                # Zero is a valid weight or rate for some settings: those say so in `_nonneg`.
                check_number(
                    f"{self.name} {f.name}",
                    v,
                    integer=integer,
                    positive=f.name not in self._nonneg(),
                )

    def _nonneg(self) -> tuple[str, ...]:
        return ("weight_decay", "momentum")

    def data_settings(self) -> dict:
        """`{field: value}` of the settings that are data (nested configs as nested dicts),
        as arrays of JAX's default float type: a pytree, one leaf per setting."""
        return _data_settings(self, self.static_settings) if self.settings_as_data else {}

    def skeleton(self) -> Method:
        """This config with every data setting replaced by None: what its programs are built
        from, so configs that differ only in data settings share them (a setting read as a
        constant by mistake fails loudly when the program is traced)."""
        return _skeleton(self, self.static_settings) if self.settings_as_data else self

    def member_arrays(self, ctx: MemberContext) -> dict[str, np.ndarray]:
        return {}

    def prepare(self, model, originals, data: DeviceData, host: dict) -> dict:
        """Device arrays of the wave computed once from the frozen `originals` (stacked, on
        device) and the wave's stacked host arrays `host` (rows, keys, `member_arrays`)."""
        return {}

    def stages(self) -> tuple[Stage, ...]:
        raise NotImplementedError

    def variables(self, state) -> dict:
        """The model's variables of a method's final state (default: its `params` and
        `batch_stats`)."""
        from camu_jax.models import state_variables

        return state_variables(state)


def _float_fields(config, static: tuple[str, ...]):
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield f.name, value
        elif f.type in ("float", float) and f.name not in static:
            yield f.name, None


def _data_settings(config, static: tuple[str, ...]) -> dict:
    dtype = jax.dtypes.canonicalize_dtype(np.float64)
    out = {}
    for name, nested in _float_fields(config, static):
        if nested is not None:
            out[name] = _data_settings(nested, getattr(nested, "static_settings", ()))
        else:
            out[name] = np.asarray(getattr(config, name), dtype)
    return out


def _skeleton(config, static: tuple[str, ...]):
    changes = {}
    for name, nested in _float_fields(config, static):
        changes[name] = (
            None if nested is None else _skeleton(nested, getattr(nested, "static_settings", ()))
        )
    return dataclasses.replace(config, **changes)


def settings(batch: dict) -> dict:
    """A member's data settings inside a step (what `stream_batch` puts in every batch)."""
    return batch["settings"]


# ------------------------------------------------------------------------------ batches


def member_keys(seed: int) -> dict[str, np.ndarray]:
    """A run's keys (as key data): counterfactual noise, fixed augmentations, step keys."""
    split = host_keys.split(host_keys.key_data(seed), 3)  # on the host: no program compiled
    return {f"{k}_key": v for k, v in zip(("noise", "aug", "step"), split, strict=True)}


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
        batch["settings"] = member["settings"]
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


def _widths(splits: Sequence[Splits]) -> dict[str, int]:
    def quantum(n):
        return max(WIDTH_QUANTUM, -(-n // WIDTH_QUANTUM) * WIDTH_QUANTUM)

    return {
        "forget": quantum(max(s.forget.size * s.repeat for s in splits)),
        "remain": quantum(max(s.remain.size for s in splits)),
        "sample": quantum(max(s.sample.size for s in splits)),
    }


def run_population(
    method: Method | Sequence[Method],
    model: nn.Module,
    originals: Sequence[dict],
    *,
    data: DeviceData,
    splits: Sequence[Splits],
    seeds: Sequence[int],
    num_classes: int,
    names: Sequence[str] | None = None,
    checkpoint_dirs: Sequence[str | Path | None] | None = None,
    metas: Sequence[dict] | None = None,
    checkpoint_every: float = 60.0,
    population_size: int | None = None,
    chunk_steps: int = 250,
    use_scan: bool | None = None,
    progress: bool = True,
    on_divergence: str = "raise",
    compile_only: bool = False,
) -> list[tuple[dict | None, dict]] | dict:
    """Runs `method` from every frozen original `originals[i]` on `splits[i]`, `seeds[i]`, at
    most `population_size` members at a time (default: the layout `engine.place` chooses for
    the phase), on the one wave runner (`camu_jax.runner`); returns per member
    `(variables, info)`. `method` is one config for every member, or one per member (a sweep:
    configs that differ only in data settings, `Method.static_settings`, run as one
    population on one set of programs).

    info: `seconds` (`run_seconds` + `compile_seconds`, the member's measured share of the
    phase's time: preparation + unlearning, `camu_jax.runner`), `construct_seconds`
    (preparation), `losses` (per chunk means), `epochs` (per-epoch means), `steps`,
    `epochs_run`, `resumed_from`, `log_dir` (step logs inside `camu_jax.logs.log_to`).

    `checkpoint_dirs[i]` (None: none) is where member i's state is saved at epoch ends (every
    `checkpoint_every` seconds, and after its last epoch) with the JSON identity `metas[i]`,
    and resumed from after a kill, bit-identically; a finished member is restored.

    A member whose loss or parameters turn non-finite: `on_divergence="raise"` raises
    FloatingPointError naming it, its phase and step; `"record"` gives it `variables=None` and
    the message as `info["diverged"]`, and the other members go on unchanged (members never
    mix: their results are those of a population without the diverged one).

    `compile_only`: compile the phase's programs and return what was compiled, without
    running (`runner.compile_ahead`; `originals` may then be stand-ins of the right shapes).
    """
    if on_divergence not in ("raise", "record"):
        raise ValueError(f"on_divergence must be 'raise' or 'record', got {on_divergence!r}")
    configs = [method] * len(originals) if isinstance(method, Method) else list(method)
    if not isinstance(method, Method) and len(configs) != len(originals):
        raise ValueError(f"{len(configs)} method configs for {len(originals)} members")
    first = method if isinstance(method, Method) else configs[0] if configs else None
    if first is None:
        raise ValueError("run_population needs at least one member (originals is empty)")
    for c in {id(c): c for c in [first, *configs]}.values():
        c.validate()
    method = first.skeleton()  # what the programs, plans and epochs are built from
    if other := next((c for c in configs if c.skeleton() != method), None):
        raise ValueError(
            f"a population runs one program: {other} differs from {first} in a setting "
            f"that is not data ({type(method).__name__}.static_settings, int fields, or "
            f"settings_as_data={method.settings_as_data})"
        )
    checks.check_splits(splits, data)
    checks.check_labels(data, num_classes)
    checks.check_model_classes(model, ("data", data), num_classes=num_classes)
    sharding.check_batch_size(method.batch_size, data.mesh)
    members = runner.members(
        method.name, originals, names, checkpoint_dirs, metas, splits=splits, seeds=seeds
    )
    widths = _widths(splits)
    ctxs = [
        MemberContext(s, sp, data.host_labels, num_classes, widths)
        for s, sp in zip(seeds, splits, strict=True)
    ]
    stages = method.stages()
    # Plans run on the host, one member at a time: each member's come from its own config (a
    # plan may read a data setting, e.g. a per-epoch schedule), programs and epochs from the
    # skeleton's.
    own = {id(c): c.stages() for c in configs}
    plans = [[s.plan for s in own[id(c)]] for c in configs]
    spec = data.spec

    def stage(k: int, st: Stage) -> runner.Stage:
        longest = max(len(next(iter(plans[i][k](c, 0).values()))) for i, c in enumerate(ctxs))
        return runner.Stage(
            name=st.name,
            key=("method", method, k, model, spec),
            program=lambda mesh: st.program(model, spec, mesh),
            plan=lambda i, epoch: plans[i][k](ctxs[i], epoch),
            epochs=st.epochs,
            chunk=max(1, min(chunk_steps, longest)),
            learning_rates=lambda i, epoch: logs.learning_rates(configs[i]),
        )

    phase = runner.Phase(
        name=method.name,
        stages=tuple(stage(k, st) for k, st in enumerate(stages)),
        member_data=lambda indices, placed: _member_data(
            method,
            model,
            [originals[i] for i in indices],
            placed,
            [ctxs[i] for i in indices],
            [configs[i] for i in indices],
        ),
        variables=method.variables,
        checkpoint_every=checkpoint_every,
        on_divergence=on_divergence,
        use_scan=use_scan,
        progress=progress,
    )
    if compile_only:
        return runner.compile_ahead(phase, members, data, population_size=population_size)
    return runner.run(phase, members, data, population_size=population_size)


def _member_data(method, model, originals, data, ctxs, configs):
    """A wave's member data on device: rows, keys, data settings, `member_arrays` (of each
    member's config), then `prepare`'s."""
    host = []
    for c, config in zip(ctxs, configs, strict=True):
        arrays = {
            "forget_rows": c.pad(c.forget, "forget"),
            "remain_rows": c.pad(c.remain, "remain"),
            "sample_rows": c.pad(c.sample, "sample"),
            "settings": config.data_settings(),
            **member_keys(c.seed),
        }
        for k, v in config.member_arrays(c).items():
            arrays[k] = c.pad(v, STREAMS[k[0]]) if k[:2] in ("f_", "r_", "s_") else v
        host.append(arrays)
    host = engine.stack(host)
    member = sharding.shard_members(host, data.mesh)
    teachers = sharding.shard_members(engine.stack(originals), data.mesh)
    member.update(method.prepare(model, teachers, data, host))
    return member
