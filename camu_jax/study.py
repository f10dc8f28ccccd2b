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
seconds), `summary` (mean and std over runs), `phases` (seconds, compile seconds, programs,
placements) and `method_configs` (the settings used).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn

from camu_jax import checkpointing, engine, metrics
from camu_jax.data.pipeline import DeviceData
from camu_jax.data.splits import Splits
from camu_jax.evaluation import evaluate
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
            [init_variables(self.model, jax.random.key(s), shape) for s in seeds],
            data=self.train,
            items=items,
            seeds=seeds,
            config=self.train_config,
            names=[f"{kind} {n}" for n in names],
            population_size=self.population_size,
            progress=self.progress,
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

    def unlearn(self, method: Method, originals: dict, on_divergence: str):
        runs = self.runs
        metas = [
            self.meta(
                method.name,
                r.seed,
                {
                    "split": digest(r.splits),
                    "run": r.name,
                    "method_config": dataclasses.asdict(method),
                },
            )
            for r in runs
        ]
        folder = f"{UNLEARNING}/{method.name}"
        return run_population(
            method,
            self.model,
            [originals[r.seed][0] for r in runs],
            data=self.train,
            splits=[r.splits for r in runs],
            seeds=[r.seed for r in runs],
            num_classes=self.num_classes,
            names=[f"{method.name} {r.name}" for r in runs],
            population_size=self.population_size,
            progress=self.progress,
            on_divergence=on_divergence,
            **self.checkpoints(method.name, [r.name for r in runs], metas, folder),
        )

    def save_unlearned(self, run: Run, method: str, variables: dict) -> None:
        if self.store is None:
            return
        checkpointing.save_next(
            Path(self.store.root) / method / f"{self.store.prefix}-{run.name}",
            variables,
            self.meta(method, run.seed, {"split": digest(run.splits), "run": run.name}),
        )


def _phase(name: str, timer: engine.Timer, members: int, **extra) -> dict:
    return {
        "phase": name,
        "seconds": timer.seconds,
        "compile_seconds": timer.compile_seconds,
        "programs_compiled": sum(timer.programs.values()),
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
    methods: Sequence[Method],
    train_config: TrainConfig,
    num_classes: int,
    relearning: RelearnConfig | None = None,
    population_size: int | None = None,
    eval_workers: int | None = None,
    on_divergence: str = "record",
    store: Store | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Runs the study (module docstring) and returns its record `{'runs', 'summary',
    'phases', 'method_configs'}`.

    runs: the (seed, forget set) runs; every method runs once per run, from the original
      of the run's seed. methods: method configs (`camu_jax.methods.get(name, **settings)`).
    relearning: the relearning check's config (None: no check).
    on_divergence: "record" (a diverged run's cells say so, the study goes on) or "raise".
    store: where models are checkpointed and restored (None: nothing is written).
    log: notes and warnings (None: silent); on process 0 only.
    """
    if on_divergence not in ("record", "raise"):
        raise ValueError(f"on_divergence must be 'record' or 'raise', got {on_divergence!r}")
    names = [m.name for m in methods]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"methods {names} name {', '.join(twice)} more than once")
    log = log if (log is not None and jax.process_index() == 0) else (lambda *_: None)
    runs = list(runs)
    s = _Study(
        model, train, test, runs, train_config, num_classes, population_size, store, progress
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
    eval_time = {"seconds": 0.0, "compile_seconds": 0.0, "programs_compiled": 0}
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
        )
        for i, why in pending[method].unscored.items():
            diverged.setdefault(method, {}).setdefault(i, why)
        eval_time["seconds"] += timer.seconds
        eval_time["compile_seconds"] += timer.compile_seconds
        eval_time["programs_compiled"] += sum(timer.programs.values())
        eval_placements.extend(timer.placements)

    timer = engine.Timer()
    originals = s.originals()
    restored = all(info["epochs_run"] == 0 for _, info in originals.values())
    phases.append(_phase("original", timer, len(originals), restored=restored))
    models = {"original": [originals[r.seed][0] for r in runs]}
    seconds = {"original": [originals[r.seed][1]["seconds"] for r in runs]}
    submit("original", models["original"])

    timer = engine.Timer()
    retrains = s.retrains()
    restored = all(info["epochs_run"] == 0 for _, info in retrains)
    phases.append(_phase("retrain", timer, len(runs), restored=restored))
    models["retrain"] = [v for v, _ in retrains]
    seconds["retrain"] = [info["seconds"] for _, info in retrains]
    submit("retrain", models["retrain"])

    infos = {}
    for method in methods:
        name = method.name
        timer = engine.Timer()
        out = s.unlearn(method, originals, on_divergence)
        resumed = sum(info["resumed_from"] > 0 for _, info in out)
        phases.append(_phase(name, timer, len(runs), resumed_members=resumed))
        infos[name] = [info for _, info in out]
        seconds[name] = [info["seconds"] for info in infos[name]]
        for i, info in enumerate(infos[name]):
            if "diverged" in info:
                diverged.setdefault(name, {})[i] = info["diverged"]
        models[name] = [v for v, _ in out]
        submit(name, models[name])
        for i, why in diverged.get(name, {}).items():
            models[name][i] = None
            log(f"warning: {name} diverged on {runs[i].name or i}: {why}; reported as diverged")
        # Saved once evaluation has shown finite outputs: finite but huge weights (a far too
        # high learning rate) pass every check during unlearning.
        for run, variables in zip(runs, models[name], strict=True):
            if variables is not None:
                s.save_unlearned(run, name, variables)
    order = (*BASELINES, *names)

    curves = {}
    relearned = (*names, "retrain")
    if relearning is not None:
        timer = engine.Timer()
        which = [(m, i) for m in relearned for i in range(len(runs)) if models[m][i] is not None]
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
            "compile_seconds": eval_time["compile_seconds"] + timer.compile_seconds,
            "programs_compiled": eval_time["programs_compiled"] + sum(timer.programs.values()),
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
                {"diverged": diverged[m][i], "seconds": seconds[m][i]}
                if scores[m][i] is None
                else {**scores[m][i], "seconds": seconds[m][i]}
            )
            for m in order
        }
        metrics.add_gaps(entries)
        for name, info in infos.items():
            entries[name]["construct_seconds"] = info[i]["construct_seconds"]
            entries[name]["compile_seconds"] = info[i]["compile_seconds"]
        classes = run.classes
        entry = {
            "forget_class": classes[0] if classes and len(classes) == 1 else classes,
            "seed": run.seed,
            "split_sizes": {**run.splits.sizes(), "test": test.size},
            "methods": entries,
        }
        if inapplicable[i]:
            entry["not_applicable"] = inapplicable[i]
        if curves:
            entry["relearn"] = {m: curves[(m, i)] for m in relearned if (m, i) in curves}
        out_runs.append(entry)
    for method, of in diverged.items():
        log(
            f"warning: {method} diverged on {len(of)} of {len(runs)} runs "
            f"({', '.join(runs[i].name or str(i) for i in sorted(of))}); its cells say so"
        )
    return {
        "method_configs": {m.name: dataclasses.asdict(m) for m in methods},
        "runs": out_runs,
        "summary": summarize(out_runs),
        "phases": phases,
    }
