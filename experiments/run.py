"""One study: original, retrain and every unlearning method (CaMU and the baselines of
`camu_jax.methods`) for every (seed, forget set), evaluated side by side.

A study runs phase by phase, each phase as populations of runs on the loop engine
(`camu_jax.engine`): all originals (one per seed), all retrains and, per method, all its runs
(one per seed x forget set), one batched evaluation of every model, all relearning checks.
`population_size` caps the members of one wave; 1 runs them one at a time (the sequential
path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
from pathlib import Path

import jax
import numpy as np

from camu_jax import checkpointing, engine, metrics, sharding
from camu_jax.data.loading import Dataset, load_dataset
from camu_jax.data.pipeline import DeviceData, input_spec_for
from camu_jax.data.splits import Splits, make_splits
from camu_jax.evaluation import evaluate
from camu_jax.methods import run_population
from camu_jax.models import create_model, init_variables
from camu_jax.relearning import RelearnConfig, relearn
from camu_jax.training import TrainConfig, train_population
from experiments.configs import ExperimentConfig
from experiments.outputs import check_output_paths
from experiments.reporting import (
    atomic_write_bytes,
    build_reports,
    remove_stale_temp_files,
    summarize,
)

BASELINES = ("original", "retrain")


def _digest(splits: Splits) -> str:
    h = hashlib.sha256()
    for a in (splits.forget, splits.sample, np.asarray([splits.repeat])):
        h.update(np.ascontiguousarray(a, np.int64).tobytes())
    return h.hexdigest()[:12]


def _save_npz(path: Path, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _clean(x):
    """JSON-safe: NaN -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """One (seed, forget set) of a study."""

    seed: int
    classes: tuple[int, ...] | None
    splits: Splits
    name: str


class Experiment:
    """Holds the data on device and runs every phase of a config's study."""

    def __init__(self, config: ExperimentConfig):
        config.validate()
        self.config = config
        devices = jax.devices()
        members = 1 if config.population_size == 1 else len(devices)
        self.mesh = sharding.make_mesh(devices, member_devices=members)
        # Every phase's batch is checked here, before any model is trained or file written.
        batches = [("", config.batch_size)] + [
            (f"{'CaMU' if name == 'camu' else name} ", m.batch_size)
            for name, m in config.method_configs().items()
        ]
        for phase, batch in batches:
            try:
                sharding.check_batch_size(batch, self.mesh)
            except ValueError as e:
                raise ValueError(f"{phase}{e}") from None
        self.data: Dataset = load_dataset(
            config.dataset,
            data_dir=config.data_dir,
            manual_dir=config.manual_dir,
            progress=config.progress and jax.process_index() == 0,
        )
        self.model = create_model(config.model, num_classes=self.data.num_classes)
        spec = input_spec_for(config.dataset, config.model)
        self.train = DeviceData.put(
            self.data.train_images, self.data.train_labels, spec=spec, mesh=self.mesh
        )
        self.test = DeviceData.put(
            self.data.test_images, self.data.test_labels, spec=spec, mesh=self.mesh
        )
        self.input_shape = self.train.input_shape
        self.workdir = Path(config.workdir)
        self.ckpt_root = Path(config.checkpoint_dir or self.workdir / "checkpoints")
        self.train_config = TrainConfig(
            epochs=config.original_epochs,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
        )

    # -- the study's runs -------------------------------------------------------------------
    def runs(self) -> list[Run]:
        """Every (seed, forget set), its splits built (and so validated) up front."""
        c = self.config
        out = []
        for seed in c.seeds:
            for classes, spec in c.forget_specs():
                splits = make_splits(
                    self.data.train_labels, spec, seed=seed, num_classes=self.data.num_classes
                )
                tag = "all" if classes is None else "-".join(map(str, classes))
                out.append(Run(seed, classes, splits, f"{c.scenario}-{tag}-seed{seed}"))
        return out

    def inapplicable(self, splits: Splits) -> dict[str, str]:
        """Attacks these split sizes cannot support (reported as null, with the reason)."""
        return metrics.inapplicable_attacks(
            n_forget=splits.forget.size,
            n_sample=splits.sample.size,
            n_remain=splits.remain.size,
            n_test=self.data.num_test,
        )

    # -- models -----------------------------------------------------------------------------
    def _meta(self, kind: str, seed: int, extra: dict | None = None) -> dict:
        """The identity of a trained model: every setting that changes its weights."""
        c = self.config
        return {
            "kind": kind,
            "dataset": c.dataset,
            "model": c.model,
            "num_classes": self.data.num_classes,
            "input_shape": list(self.input_shape),
            "seed": seed,
            "epochs": c.original_epochs,
            "batch_size": c.batch_size,
            "learning_rate": c.learning_rate,
            "weight_decay": c.weight_decay,
            "train_data_sha256": self.data.train_fingerprint,
            **(extra or {}),
        }

    def _directory(self, kind: str, name: str, meta: dict) -> Path:
        """`<kind>/<name>-<identity hash>`: a model trained with other settings lives in its
        own directory instead of being restored by mistake."""
        ident = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:8]
        return self.ckpt_root / kind / f"{name}-{ident}"

    def _train(self, kind: str, seeds, items, names, extras) -> list[tuple[dict, dict]]:
        c = self.config
        metas = [self._meta(kind, s, e) for s, e in zip(seeds, extras, strict=True)]
        return train_population(
            self.model,
            [init_variables(self.model, jax.random.key(s), self.input_shape) for s in seeds],
            data=self.train,
            items=items,
            seeds=seeds,
            config=self.train_config,
            names=[f"{kind} {n}" for n in names],
            checkpoint_dirs=[
                self._directory(kind, n, m) for n, m in zip(names, metas, strict=True)
            ],
            metas=metas,
            population_size=c.population_size,
            progress=c.progress,
            desc=kind,
        )

    def originals(self, seeds) -> dict[int, tuple[dict, dict]]:
        """The original model on all of D, one per seed: trained once per identity."""
        c = self.config
        names = [f"{c.dataset}-{c.model}-seed{s}-ep{c.original_epochs}" for s in seeds]
        items = [np.arange(self.data.num_train)] * len(seeds)
        out = self._train("original", list(seeds), items, names, [None] * len(seeds))
        return dict(zip(seeds, out, strict=True))

    def retrains(self, runs: list[Run]) -> list[tuple[dict, dict]]:
        """The gold standard: the same recipe on D_r only, once per identity and split."""
        c = self.config
        digests = [_digest(r.splits) for r in runs]
        names = [
            f"{c.dataset}-{c.model}-seed{r.seed}-ep{c.original_epochs}-split{d}"
            for r, d in zip(runs, digests, strict=True)
        ]
        return self._train(
            "retrain",
            [r.seed for r in runs],
            [r.splits.remain for r in runs],
            names,
            [{"split": d} for d in digests],
        )

    def unlearn(
        self, method, runs: list[Run], originals: dict, *, record: bool = False
    ) -> list[tuple[dict | None, dict]]:
        """`method` from each run's original; with `record`, a run that diverges gives
        `(None, info)` with `info["diverged"]` instead of raising."""
        c = self.config
        return run_population(
            method,
            self.model,
            [originals[r.seed][0] for r in runs],
            data=self.train,
            splits=[r.splits for r in runs],
            seeds=[r.seed for r in runs],
            num_classes=self.data.num_classes,
            names=[f"{method.name} {r.name}" for r in runs],
            population_size=c.population_size,
            progress=c.progress,
            on_divergence="record" if record else "raise",
        )

    def save_unlearned(self, run: Run, method: str, variables: dict) -> None:
        checkpointing.save_next(
            self.ckpt_root / method / f"{self.config.dataset}-{self.config.model}-{run.name}",
            variables,
            self._meta(method, run.seed, {"split": _digest(run.splits), "run": run.name}),
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


def run_experiment(config: ExperimentConfig, *, log=print) -> dict:
    """Runs the study of `config` phase by phase; writes `results.json` and the reports
    (atomically) into `config.workdir`; returns the results dict.

    The work dir is locked (`checkpointing.lock_directory`) from before its first file is
    written until the end: a second run on it raises `checkpointing.DirectoryInUseError`
    naming this process."""
    with contextlib.ExitStack() as held:
        return _run_experiment(config, log, held)


def _run_experiment(config: ExperimentConfig, log, held: contextlib.ExitStack) -> dict:
    exp = Experiment(config)
    # Across processes (`jax.distributed`) every process runs the study; process 0 alone
    # reports and writes results, splits and reports.
    main = jax.process_index() == 0
    log = log if main else lambda *_: None
    runs = exp.runs()
    for run in runs:
        for attack, why in exp.inapplicable(run.splits).items():
            where = f"seed {run.seed}" + ("" if run.classes is None else f", classes {run.classes}")
            log(f"note: {attack} not applicable ({where}): {why}")
    workdir = exp.workdir
    check_output_paths(
        workdir,
        exp.ckpt_root,
        (*BASELINES, *config.method_configs()),
        f"{config.dataset}-{config.model}-",
        [r.name for r in runs],
    )
    workdir.mkdir(parents=True, exist_ok=True)
    if main:
        held.enter_context(checkpointing.lock_directory(workdir))
        remove_stale_temp_files(workdir, workdir / "splits")  # Left by a killed run.
        for run in runs:
            _save_npz(workdir / "splits" / f"{run.name}.npz", run.splits.to_arrays())
    phases = []

    # Each phase's models are scored as soon as they exist: the forward pass (and its logits
    # check) now, the attacks in worker processes while the next phases train.
    pending, eval_time = {}, {"seconds": 0.0, "compile_seconds": 0.0, "programs_compiled": 0}
    eval_placements = []

    # {method: {run index: why}}: unlearned models whose loss, parameters or logits turned
    # non-finite (on_divergence="record"); their cells say so and they are neither saved nor
    # relearned.
    diverged: dict[str, dict[int, str]] = {}
    record = config.on_divergence == "record"

    def submit(method: str, variables: list[dict | None]) -> None:
        timer = engine.Timer()
        pending[method] = evaluate(
            exp.model,
            variables,
            train=exp.train,
            test=exp.test,
            splits=[r.splits for r in runs],
            forget_classes=[r.classes for r in runs],
            seeds=[r.seed for r in runs],
            names=[f"the {method} model of {r.name}" for r in runs],
            population_size=config.population_size,
            workers=config.eval_workers,
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
    originals = exp.originals(config.seeds)
    restored = all(info["epochs_run"] == 0 for _, info in originals.values())
    phases.append(_phase("original", timer, len(config.seeds), restored=restored))
    models = {"original": [originals[r.seed][0] for r in runs]}
    submit("original", models["original"])

    timer = engine.Timer()
    retrains = exp.retrains(runs)
    restored = all(info["epochs_run"] == 0 for _, info in retrains)
    phases.append(_phase("retrain", timer, len(runs), restored=restored))
    models["retrain"] = [v for v, _ in retrains]
    submit("retrain", models["retrain"])

    method_configs = config.method_configs()
    unlearned = {}
    for name, method in method_configs.items():
        timer = engine.Timer()
        unlearned[name] = exp.unlearn(method, runs, originals, record=record)
        phases.append(_phase(name, timer, len(runs)))
        for i, (_, info) in enumerate(unlearned[name]):
            if "diverged" in info:
                diverged.setdefault(name, {})[i] = info["diverged"]
        models[name] = [v for v, _ in unlearned[name]]
        submit(name, models[name])
        for i, why in diverged.get(name, {}).items():
            models[name][i] = None
            log(f"warning: {name} diverged on {runs[i].name}: {why}; reported as diverged")
        # Saved once evaluation has shown finite outputs: finite but huge weights (a far too
        # high learning rate) pass every check during unlearning.
        for run, variables in zip(runs, models[name], strict=True):
            if variables is not None:
                exp.save_unlearned(run, name, variables)
    methods = (*BASELINES, *method_configs)

    curves = {}
    relearned = (*method_configs, "retrain")
    if config.relearn:
        timer = engine.Timer()
        which = [(m, i) for m in relearned for i in range(len(runs)) if models[m][i] is not None]
        out = relearn(
            exp.model,
            [models[m][i] for m, i in which],
            data=exp.train,
            splits=[runs[i].splits for _, i in which],
            seeds=[runs[i].seed for _, i in which],
            config=RelearnConfig(
                train=dataclasses.replace(exp.train_config, epochs=1), every=config.relearn_every
            ),
            names=[f"relearn {m} {runs[i].name}" for m, i in which],
            population_size=config.population_size,
            progress=config.progress,
        )
        curves = dict(zip(which, out, strict=True))
        phases.append(_phase("relearn", timer, len(which)))

    timer = engine.Timer()
    scores = {m: pending[m].result() for m in methods}
    phases.append(
        {
            "phase": "evaluation",
            "seconds": eval_time["seconds"] + timer.seconds,
            "compile_seconds": eval_time["compile_seconds"] + timer.compile_seconds,
            "programs_compiled": eval_time["programs_compiled"] + sum(timer.programs.values()),
            "members": len(methods) * len(runs),
            "placement": eval_placements,
            "note": "forward passes, plus the wait for attacks still running at the end; "
            "the rest of the attack fitting overlapped the later phases",
        }
    )
    seconds = {
        "original": [originals[r.seed][1]["seconds"] for r in runs],
        "retrain": [info["seconds"] for _, info in retrains],
        **{name: [info["seconds"] for _, info in out] for name, out in unlearned.items()},
    }
    results_runs = []
    for i, run in enumerate(runs):
        entries = {
            m: (
                {"diverged": diverged[m][i], "seconds": seconds[m][i]}
                if scores[m][i] is None
                else {**scores[m][i], "seconds": seconds[m][i]}
            )
            for m in methods
        }
        metrics.add_gaps(entries)
        for name, out in unlearned.items():
            info = out[i][1]
            entries[name]["construct_seconds"] = info["construct_seconds"]
            entries[name]["compile_seconds"] = info["compile_seconds"]
        entry = {
            "forget_class": (
                run.classes[0] if run.classes and len(run.classes) == 1 else run.classes
            ),
            "seed": run.seed,
            "split_sizes": {**run.splits.sizes(), "test": exp.data.num_test},
            "split_file": f"splits/{run.name}.npz",
            "methods": entries,
        }
        if skip := exp.inapplicable(run.splits):
            entry["not_applicable"] = skip
        if curves:
            entry["relearn"] = {m: curves[(m, i)] for m in relearned if (m, i) in curves}
        results_runs.append(entry)
        log(format_table(entry))

    results = {
        # The CaMU settings actually used, preset included.
        "config": _clean(
            dataclasses.asdict(dataclasses.replace(config, camu=config.camu_config()))
        ),
        "method_configs": _clean(
            {name: dataclasses.asdict(m) for name, m in method_configs.items()}
        ),
        "dataset": config.dataset,
        "scenario": config.scenario,
        "model": config.model,
        "devices": [str(d) for d in exp.mesh.devices.flat],
        "mesh": dict(exp.mesh.shape),
        "versions": {"jax": jax.__version__},
        "runs": results_runs,
        "summary": summarize(results_runs),
        "phases": phases,
    }
    results = _clean(results)
    for method, runs_of in diverged.items():
        log(
            f"warning: {method} diverged on {len(runs_of)} of {len(runs)} runs "
            f"({', '.join(runs[i].name for i in sorted(runs_of))}); its cells say so"
        )
    if main:
        atomic_write_bytes(workdir / "results.json", json.dumps(results, indent=2).encode())
        try:
            build_reports(results, workdir)
        except OSError as e:
            # The figures are safe in results.json; the reports can be made again from it.
            raise OSError(
                e.errno,
                f"{e.strerror}; results.json is written: rebuild the reports with "
                f"`python -m experiments.report {workdir}`",
                e.filename,
            ) from e
    return results


def format_table(run: dict) -> str:
    """A plain-text table of one run's metrics, one row per method."""
    cols = [
        ("remain_train_acc", "D_r acc"),
        ("forget_train_acc", "D_f acc"),
        ("test_acc", "test"),
        ("test_remain_acc", "test rem"),
        ("test_forget_acc", "test fgt"),
        ("mia", "MIA"),
        ("mia_efficacy", "MIA-eff"),
        ("avg_gap", "AvgGap"),
        ("seconds", "time s"),
    ]
    head = f"forget {run['forget_class']} seed {run['seed']}  sizes {run['split_sizes']}"
    width = max(10, *(len(m) + 1 for m in run["methods"]))
    lines = [head, f"{'method':<{width}}" + "".join(f"{h:>10}" for _, h in cols)]
    for method, r in run["methods"].items():
        if "diverged" in r:
            lines.append(f"{method:<{width}}  diverged: {r['diverged']}")
            continue
        cells = "".join(
            f"{'-':>10}"
            if r.get(k) is None or (isinstance(r.get(k), float) and math.isnan(r[k]))
            else f"{r[k]:>10.2f}"
            for k, _ in cols
        )
        lines.append(f"{method:<{width}}{cells}")
    return "\n".join(lines)
