"""The study: original, retrain and unlearning methods on the same runs, scored side by side.

`run_study` is the one study of the project: the notebook's `camu_jax.compare` and the main
job (`python -m experiments.unlearn`, a shell that adds flags, a work dir and files) both run
it, so both get the same numbers from the same code. Phase by phase, each phase a population
on the wave runner (`camu_jax.runner`):

1. the originals (one per seed) and 2. the retrained models (one per run), trained once per
   identity when a checkpoint `Store` is given, restored otherwise;
3. every method's runs (one per run), checkpointed at epoch ends in the store and resumed after
   a kill; a run whose loss or parameters turn non-finite is recorded as diverged
   (`on_divergence="record"`) or stops the study (`"raise"`);
4. the scoring of each phase's models, started as soon as they exist (the forward passes at
   once, the membership attacks in worker processes while the next phases train);
5. the relearning check of every unlearned and retrained model.

It returns one record: `runs` (per run its sizes and per method the metrics, gaps to Retrain,
seconds split into compiling and running, per-epoch loss means and, inside
`camu_jax.logs.log_to`, where its step logs are), `summary` (mean and std over runs),
`phases` (seconds, compile seconds, programs, placements) and `method_configs` (the settings used).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn

from camu_jax import checkpointing, engine, metrics
from camu_jax import keys as host_keys
from camu_jax.data.pipeline import DeviceData
from camu_jax.data.splits import Splits
from camu_jax.evaluation import evaluate
from camu_jax.methods.adapter import FunctionMethod, run_function
from camu_jax.methods.base import Method, run_population
from camu_jax.models import init_variables
from camu_jax.relearning import RelearnConfig, relearn
from camu_jax.results import BASELINES, summarize
from camu_jax.training import TrainConfig, train_population

# The folder of the store that holds the methods' checkpoints during unlearning (resume).
UNLEARNING = "unlearning"


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """One (seed, forget set) of a study: `classes` are its forgotten classes (class
    removal) or None; `name` names it in messages and checkpoint folders."""

    seed: int
    splits: Splits
    classes: tuple[int, ...] | None = None
    name: str = ""


@dataclasses.dataclass(frozen=True)
class Store:
    """Where a study keeps its models: `<root>/<kind>/<prefix>-<name>-<identity hash>`.

    identity: what names the data and model beyond the recipe (`dataset`, `model`,
    `train_data_sha256`); stored with every checkpoint and checked on restore, so a model
    trained with other settings or data is never restored by mistake. Models are saved at
    epoch ends every `checkpoint_every` seconds and after their last epoch."""

    root: Path
    prefix: str
    identity: dict
    checkpoint_every: float = 60.0

    def directory(self, kind: str, name: str, meta: dict) -> Path:
        ident = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:8]
        return Path(self.root) / kind / f"{self.prefix}-{name}-{ident}"


def digest(splits: Splits) -> str:
    """A short hash of a run's forget set (and its sample and repeat)."""
    h = hashlib.sha256()
    for a in (splits.forget, splits.sample, np.asarray([splits.repeat])):
        h.update(np.ascontiguousarray(a, np.int64).tobytes())
    return h.hexdigest()[:12]


@dataclasses.dataclass
class _Study:
    model: nn.Module
    train: DeviceData
    test: DeviceData
    runs: list[Run]
    train_config: TrainConfig
    num_classes: int
    population_size: int | None
    store: Store | None
    progress: bool
    use_scan: bool | None = None
    # {seed: sha256} of originals given by the caller (None: trained here), part of the
    # identity of the methods' checkpoints: they start from those models.
    original_digests: dict[int, str] | None = None

    def meta(self, kind: str, seed: int, extra: dict | None = None) -> dict:
        """The identity of a trained model: every setting that changes its weights."""
        c = self.train_config
        return json.loads(
            json.dumps(
                {
                    "kind": kind,
                    **(self.store.identity if self.store else {}),
                    "num_classes": self.num_classes,
                    "input_shape": list(self.train.input_shape),
                    "seed": seed,
                    "epochs": c.epochs,
                    "batch_size": c.batch_size,
                    "learning_rate": c.learning_rate,
                    "weight_decay": c.weight_decay,
                    **(extra or {}),
                }
            )
        )

    def checkpoints(self, kind: str, names, metas, folder: str | None = None) -> dict:
        if self.store is None:
            return {}
        return {
            "checkpoint_dirs": [
                self.store.directory(folder or kind, n, m)
                for n, m in zip(names, metas, strict=True)
            ],
            "metas": metas,
            "checkpoint_every": self.store.checkpoint_every,
        }

    def train_models(self, kind: str, seeds, items, names, extras):
        metas = [self.meta(kind, s, e) for s, e in zip(seeds, extras, strict=True)]
        shape = self.train.input_shape
        return train_population(
            self.model,
            [init_variables(self.model, host_keys.key_data(s), shape) for s in seeds],
            data=self.train,
            items=items,
            seeds=seeds,
            config=self.train_config,
            names=[f"{kind} {n}" for n in names],
            population_size=self.population_size,
            progress=self.progress,
            use_scan=self.use_scan,
            desc=kind,
            **self.checkpoints(kind, names, metas),
        )

    def originals(self) -> dict[int, tuple[dict, dict]]:
        seeds = sorted({r.seed for r in self.runs})
        names = [f"seed{s}-ep{self.train_config.epochs}" for s in seeds]
        items = [np.arange(self.train.size)] * len(seeds)
        out = self.train_models("original", seeds, items, names, [None] * len(seeds))
        return dict(zip(seeds, out, strict=True))

    def retrains(self) -> list[tuple[dict, dict]]:
        digests = [digest(r.splits) for r in self.runs]
        names = [
            f"seed{r.seed}-ep{self.train_config.epochs}-split{d}"
            for r, d in zip(self.runs, digests, strict=True)
        ]
        return self.train_models(
            "retrain",
            [r.seed for r in self.runs],
            [r.splits.remain for r in self.runs],
            names,
            [{"split": d} for d in digests],
        )

    def unlearn(
        self,
        group: list[Method],
        labels: list[str],
        originals: dict,
        on_divergence: str,
        compile_only: bool = False,
    ):
        """Every point of a method's sweep (`group`, one config per point) on every run from
        `originals[seed]` (variables): `{label: [(variables, info) per run]}`. Points that
        differ only in data settings (`Method.static_settings`) run as members of one
        population, on one program. `compile_only`: compile what it would run (`originals`
        may be stand-ins) and return `{"records": [compile record per program group]}`."""
        runs = self.runs
        out: dict[str, list] = {}
        if isinstance(group[0], FunctionMethod):  # plain functions: member by member
            if compile_only:
                return {"records": []}
            for config, label in zip(group, labels, strict=True):
                out[label] = run_function(
                    config,
                    [originals[r.seed] for r in runs],
                    data=self.train,
                    validation=self.test,
                    splits=[r.splits for r in runs],
                    seeds=[r.seed for r in runs],
                    names=[f"{label} {r.name}" for r in runs],
                    on_divergence=on_divergence,
                )
            return out
        by_program: dict = {}
        for config, label in zip(group, labels, strict=True):
            by_program.setdefault(config.skeleton(), []).append((config, label))
        for points in by_program.values():
            members = [(config, label, r) for config, label in points for r in runs]
            metas = [
                self.meta(
                    config.name,
                    r.seed,
                    {
                        "split": digest(r.splits),
                        "run": r.name,
                        "method_config": dataclasses.asdict(config),
                        **(
                            {"original": self.original_digests[r.seed]}
                            if self.original_digests
                            else {}
                        ),
                    },
                )
                for config, _, r in members
            ]
            folder = f"{UNLEARNING}/{group[0].name}"
            checkpoints = (
                {}
                if compile_only
                else self.checkpoints(group[0].name, [r.name for _, _, r in members], metas, folder)
            )
            results = run_population(
                [config for config, _, _ in members],
                self.model,
                [originals[r.seed] for _, _, r in members],
                data=self.train,
                splits=[r.splits for _, _, r in members],
                seeds=[r.seed for _, _, r in members],
                num_classes=self.num_classes,
                names=[f"{label} {r.name}" for _, label, r in members],
                population_size=self.population_size,
                progress=self.progress,
                on_divergence=on_divergence,
                use_scan=self.use_scan,
                compile_only=compile_only,
                **checkpoints,
            )
            if compile_only:
                out.setdefault("records", []).append(results)
                continue
            for (_, label, _), result in zip(members, results, strict=True):
                out.setdefault(label, []).append(result)
        return out

    def save_unlearned(self, run: Run, method: str, variables: dict) -> None:
        if self.store is None:
            return
        checkpointing.save_next(
            Path(self.store.root) / folder_name(method) / f"{self.store.prefix}-{run.name}",
            variables,
            self.meta(method, run.seed, {"split": digest(run.splits), "run": run.name}),
        )


class _CompileAhead:
    """Compiles each method phase's programs in one background thread (`engine.compile_scope`
    "ahead": not counted in the phase running meanwhile), on stand-ins of the originals
    (their initial variables: the same shapes); `wait(name)` returns what was compiled for
    method `name` (None when nothing was), once it is done."""

    def __init__(self, s: _Study, groups, labels, on_divergence, enabled, log):
        if enabled is None:
            enabled = jax.process_count() == 1
        self.log, self.futures, self.pool = log, {}, None
        if not enabled:
            return
        shape = s.train.input_shape
        # The originals' shapes without running (or compiling) the model's init: the
        # original phase compiles that, and records it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the original phase's init warns, once
            shapes = jax.eval_shape(lambda: init_variables(s.model, jax.random.key(0), shape))
        stand_in = jax.tree.map(
            lambda x: np.full(x.shape, 0.01 if np.issubdtype(x.dtype, np.floating) else 0, x.dtype),
            shapes,
        )
        stand_ins = {seed: stand_in for seed in sorted({r.seed for r in s.runs})}
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="camu-compile")
        for group, group_labels in zip(groups, labels, strict=True):
            if isinstance(group[0], FunctionMethod):  # no program of the engine
                continue

            def job(group=group, group_labels=group_labels):
                with engine.compile_scope(f"ahead {group[0].name}"):
                    out = s.unlearn(
                        group, group_labels, stand_ins, on_divergence, compile_only=True
                    )
                records = out["records"]
                return {
                    "seconds": sum(r["seconds"] for r in records),
                    **engine.sum_compile_records(records),
                }

            self.futures[group[0].name] = self.pool.submit(job)

    def wait(self, name: str) -> dict | None:
        future = self.futures.pop(name, None)
        if future is None:
            return None
        try:
            return future.result()
        except Exception as e:  # the phase compiles its programs itself
            self.log(f"warning: compiling {name} ahead failed ({type(e).__name__}: {e})")
            return None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def point_labels(group: Sequence[Method]) -> list[str]:
    """The row names of a method's sweep: its name for one config, else `name[field=value,
    ...]` naming the settings in which the points differ (nested configs' fields by their
    own names, as `--set` spells them)."""
    name = group[0].name
    if len(group) == 1:
        return [name]
    flat = [_flat(dataclasses.asdict(c)) for c in group]
    differ = [k for k in flat[0] if len({repr(f[k]) for f in flat}) > 1]
    labels = [f"{name}[{','.join(f'{k}={f[k]!r}' for k in differ)}]" for f in flat]
    if len(set(labels)) != len(labels):
        twice = sorted({x for x in labels if labels.count(x) > 1})
        raise ValueError(f"{name}: the sweep holds the same settings twice ({', '.join(twice)})")
    return labels


def folder_name(label: str) -> str:
    """A row's checkpoint folder: `ft[learning_rate=0.1,momentum=0.9]` ->
    `ft@learning_rate=0.1+momentum=0.9` (no glob characters: Orbax globs below it)."""
    return label.replace("[", "@").replace("]", "").replace(",", "+")


def _flat(tree: dict) -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v) if isinstance(v, dict) else {k: v})
    return out


def _times(info: dict) -> dict:
    """A model's seconds in its results entry (`runner.run`'s measured shares)."""
    return {k: info[k] for k in ("seconds", "run_seconds", "compile_seconds")}


def _phase(name: str, timer: engine.Timer, members: int, **extra) -> dict:
    return {
        "phase": name,
        "seconds": timer.seconds,
        # programs_compiled: XLA compilations (what users wait for); programs_loaded: programs
        # loaded from the persistent compilation cache; their seconds and names apart.
        **timer.compile_record(),
        "members": members,
        # How each program of the phase was laid out on the devices (`engine.place`).
        "placement": timer.placements,
        **extra,
    }


def run_study(
    model: nn.Module,
    *,
    train: DeviceData,
    test: DeviceData,
    runs: Sequence[Run],
    methods: Sequence[Method | Sequence[Method]],
    train_config: TrainConfig,
    num_classes: int,
    relearning: RelearnConfig | None = None,
    population_size: int | None = None,
    eval_workers: int | None = None,
    on_divergence: str = "record",
    store: Store | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    compile_ahead: bool | None = None,
    use_scan: bool | None = None,
    originals: Mapping[int, dict] | None = None,
    return_models: bool = False,
) -> dict:
    """Runs the study (module docstring) and returns its record `{'runs', 'summary',
    'phases', 'method_configs'}` (with `return_models`, also `'models'`).

    runs: the (seed, forget set) runs; every method runs once per run, from the original
      of the run's seed. methods: method configs (`camu_jax.methods.get(name, **settings)`),
      or for a sweep a list of one method's configs: every point runs on every run (points
      that differ only in data settings as one population, one compile) and is one row,
      named by `point_labels` (`ft[learning_rate=0.01]`).
    relearning: the relearning check's config (None: no check).
    on_divergence: "record" (a diverged run's cells say so, the study goes on) or "raise".
    store: where models are checkpointed and restored (None: nothing is written).
    log: notes and warnings (None: silent); on process 0 only.
    compile_ahead: compile every method phase's programs in a background thread from the
      study's start (on stand-ins of the originals: programs depend on shapes only), so that
      a phase finds them compiled; each phase records what was compiled for it ahead
      (`compiled_ahead`). Default: on in one process. On an accelerator the host's cores are
      idle while the device trains; on a CPU the thread shares the cores with training, so
      it saves less (`--methods all` on digits, 2 cores: 10 % of the wall, docs/benchmarks.md)
      but still overlaps compiling with the originals' training, with the membership attacks'
      fitting and with Python's work between steps. Where a CPU phase times layouts
      (`engine.place`), the thread compiles its fallback (one member at a time on one device,
      the layout timed first); another layout the phase chooses, it compiles itself.
    use_scan: scanned chunks or one call per step (default: the engine's, by backend and, on
      CPU, by each program's convolutions: `engine.default_use_scan`).
    originals: `{seed: variables}` of trained originals to start from, one for every seed of
      `runs` (checked by the caller, `camu_jax.compare`): no original phase runs, their
      `seconds` are None, and the methods' checkpoints in `store` name their digest.
    return_models: add `'models'`: `{'original' | 'retrain' | row label: [variables or None
      (diverged) per run]}`, host arrays (not JSON: leave it out of results files).
    methods: besides population methods, `camu_jax.methods.from_function` methods, run member
      by member.
    """
    if on_divergence not in ("record", "raise"):
        raise ValueError(f"on_divergence must be 'record' or 'raise', got {on_divergence!r}")
    groups = [[m] if isinstance(m, Method) else list(m) for m in methods]
    for group in groups:
        if not group or any(c.name != group[0].name for c in group):
            raise ValueError(f"a sweep holds configs of one method, got {group}")
    names = [g[0].name for g in groups]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"methods {names} name {', '.join(twice)} more than once")
    labels = [point_labels(g) for g in groups]
    configs = {
        label: c
        for g, ls in zip(groups, labels, strict=True)
        for c, label in zip(g, ls, strict=True)
    }
    log = log if (log is not None and jax.process_index() == 0) else (lambda *_: None)
    runs = list(runs)
    s = _Study(
        model,
        train,
        test,
        runs,
        train_config,
        num_classes,
        population_size,
        store,
        progress,
        use_scan,
        None
        if originals is None
        else {seed: checkpointing.state_digest(v) for seed, v in originals.items()},
    )
    record = on_divergence == "record"
    inapplicable = []
    for run in runs:
        skip = metrics.inapplicable_attacks(
            n_forget=run.splits.forget.size,
            n_sample=run.splits.sample.size,
            n_remain=run.splits.remain.size,
            n_test=test.size,
        )
        inapplicable.append(skip)
        for attack, why in skip.items():
            where = f"seed {run.seed}" + ("" if run.classes is None else f", classes {run.classes}")
            log(f"note: {attack} not applicable ({where}): {why}")

    phases, pending, eval_placements = [], {}, []
    eval_time = {"seconds": 0.0, "compile": []}  # the evaluation phase's time, in pieces
    # {method: {run index: why}}: models whose loss, parameters or logits turned non-finite;
    # their cells say so and they are neither saved nor relearned.
    diverged: dict[str, dict[int, str]] = {}

    def submit(method: str, variables: list[dict | None]) -> None:
        # Scored as soon as the models exist: the forward pass (and its logits check) now,
        # the attacks in worker processes while the next phases train.
        timer = engine.Timer()
        pending[method] = evaluate(
            model,
            variables,
            train=train,
            test=test,
            splits=[r.splits for r in runs],
            forget_classes=[r.classes for r in runs],
            seeds=[r.seed for r in runs],
            names=[f"the {method} model of {r.name or f'seed {r.seed}'}" for r in runs],
            population_size=population_size,
            workers=eval_workers,
            wait=False,
            skip_nonfinite=record and method not in BASELINES,
            progress=progress,
            desc=f"evaluation {method}",
        )
        for i, why in pending[method].unscored.items():
            diverged.setdefault(method, {}).setdefault(i, why)
        eval_time["seconds"] += timer.seconds
        eval_time["compile"].append(timer.compile_record())
        eval_placements.extend(timer.placements)

    # The method phases' programs compile in a background thread from here on (on
    # accelerators), while the originals and retrains train.
    ahead = _CompileAhead(s, groups, labels, on_divergence, compile_ahead, log)
    try:
        if originals is None:
            timer = engine.Timer()
            originals = s.originals()
            restored = all(info["epochs_run"] == 0 for _, info in originals.values())
            phases.append(_phase("original", timer, len(originals), restored=restored))
        else:  # given: nothing trained, no time of training
            given = {"seconds": None, "run_seconds": None, "compile_seconds": None}
            given.update(epochs=[], log_dir=None)  # the keys of a trained model's info
            originals = {seed: (v, given) for seed, v in originals.items()}
        models = {"original": [originals[r.seed][0] for r in runs]}
        # Per model, its phase's info: seconds, per-epoch means, step logs.
        seconds = {"original": [originals[r.seed][1] for r in runs]}
        submit("original", models["original"])

        timer = engine.Timer()
        retrains = s.retrains()
        restored = all(info["epochs_run"] == 0 for _, info in retrains)
        phases.append(_phase("retrain", timer, len(runs), restored=restored))
        models["retrain"] = [v for v, _ in retrains]
        seconds["retrain"] = [info for _, info in retrains]
        submit("retrain", models["retrain"])

        infos = {}
        for group, group_labels in zip(groups, labels, strict=True):
            name = group[0].name
            compiled_ahead = ahead.wait(name)  # before the timer: not this phase's work
            timer = engine.Timer()
            out = s.unlearn(
                group, group_labels, {k: v for k, (v, _) in originals.items()}, on_divergence
            )
            resumed = sum(info["resumed_from"] > 0 for points in out.values() for _, info in points)
            extra = {"points": len(group)} if len(group) > 1 else {}
            if compiled_ahead is not None:
                extra["compiled_ahead"] = compiled_ahead
                # A model's compile seconds count its programs wherever they were compiled:
                # what was compiled ahead, split equally over the members that ran.
                ran = [i for lb in group_labels for _, i in out[lb] if i.get("epochs_run", 1) > 0]
                for info in ran:
                    share = compiled_ahead["compile_seconds"] / len(ran)
                    info["compile_seconds"] += share
                    info["seconds"] += share
            phases.append(
                _phase(name, timer, len(runs) * len(group), resumed_members=resumed, **extra)
            )
            for label in group_labels:
                infos[label] = [info for _, info in out[label]]
                seconds[label] = infos[label]
                for i, info in enumerate(infos[label]):
                    if "diverged" in info:
                        diverged.setdefault(label, {})[i] = info["diverged"]
                models[label] = [v for v, _ in out[label]]
                submit(label, models[label])
                for i, why in diverged.get(label, {}).items():
                    models[label][i] = None
                    log(
                        f"warning: {label} diverged on {runs[i].name or i}: {why}; "
                        "reported as diverged"
                    )
                # Saved once evaluation has shown finite outputs: finite but huge weights (a far
                # too high learning rate) pass every check during unlearning.
                for run, variables in zip(runs, models[label], strict=True):
                    if variables is not None:
                        s.save_unlearned(run, label, variables)
        names = list(configs)
        order = (*BASELINES, *names)

        curves = {}
        relearned = (*names, "retrain")
        if relearning is not None:
            timer = engine.Timer()
            which = [
                (m, i) for m in relearned for i in range(len(runs)) if models[m][i] is not None
            ]
            out = relearn(
                model,
                [models[m][i] for m, i in which],
                data=train,
                splits=[runs[i].splits for _, i in which],
                seeds=[runs[i].seed for _, i in which],
                config=relearning,
                names=[f"relearn {m} {runs[i].name}" for m, i in which],
                population_size=population_size,
                progress=progress,
            )
            curves = dict(zip(which, out, strict=True))
            phases.append(_phase("relearn", timer, len(which)))

        timer = engine.Timer()
        scores = {m: pending[m].result() for m in order}
        phases.append(
            {
                "phase": "evaluation",
                "seconds": eval_time["seconds"] + timer.seconds,
                **engine.sum_compile_records([*eval_time["compile"], timer.compile_record()]),
                "members": len(order) * len(runs),
                "placement": eval_placements,
                "note": "forward passes, plus the wait for attacks still running at the end; "
                "the rest of the attack fitting overlapped the later phases",
            }
        )
        out_runs = []
        for i, run in enumerate(runs):
            entries = {
                m: (
                    {"diverged": diverged[m][i], **_times(seconds[m][i])}
                    if scores[m][i] is None
                    else {**scores[m][i], **_times(seconds[m][i])}
                )
                for m in order
            }
            metrics.add_gaps(entries)
            for name, info in infos.items():
                entries[name]["construct_seconds"] = info[i]["construct_seconds"]
            classes = run.classes
            entry = {
                "forget_class": classes[0] if classes and len(classes) == 1 else classes,
                "seed": run.seed,
                "split_sizes": {**run.splits.sizes(), "test": test.size},
                "methods": entries,
            }
            if inapplicable[i]:
                entry["not_applicable"] = inapplicable[i]
            # Per model, the means of each epoch's steps (stage, epoch, steps, losses, learning
            # rates), and where its step logs are (`camu_jax.logs`).
            entry["losses"] = {m: seconds[m][i]["epochs"] for m in order}
            if log_dirs := {m: seconds[m][i]["log_dir"] for m in order if seconds[m][i]["log_dir"]}:
                entry["logs"] = log_dirs
            if curves:
                entry["relearn"] = {m: curves[(m, i)] for m in relearned if (m, i) in curves}
            out_runs.append(entry)
        for method, of in diverged.items():
            log(
                f"warning: {method} diverged on {len(of)} of {len(runs)} runs "
                f"({', '.join(runs[i].name or str(i) for i in sorted(of))}); its cells say so"
            )
        out = {
            "method_configs": {label: dataclasses.asdict(c) for label, c in configs.items()},
            "runs": out_runs,
            "summary": summarize(out_runs),
            "phases": phases,
        }
        if return_models:
            out["models"] = {m: models[m] for m in order}
        return out
    finally:
        ahead.close()
