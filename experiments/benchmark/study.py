"""A whole study (`python -m experiments.unlearn`) in population mode against the sequential
path (`--population-size 1`).

Each run is its own subprocess, started from cold caches: a fresh process (no in-memory
compilation cache survives from an earlier run), an empty persistent compilation cache
(`--xla-cache`) and an empty workdir (no checkpoint to restore). Runs go one after the other,
never in parallel; with repeats the modes alternate (population, sequential, population, ...)
and medians are reported. Per run: the subprocess's wall seconds, and from its results.json
`phases` the compile seconds (all phases) and the seconds of training (original + retrain),
unlearning (camu), evaluation and relearning.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .data import EXPERIMENTS, ROOT
from .timing import alternate, median

STUDY_DATASETS = ("digits", "mnist", "fashion_mnist")  # the PyTorch port's data: MNIST-like
DEFAULT_SEEDS = (0, 1)
# The flags that make each mode and each run cold; set here, never taken from --study-args.
MANAGED_FLAGS = (
    "--workdir",
    "--checkpoint-dir",
    "--xla-cache",
    "--population-size",
    "--progress",
    "--no-progress",
)
MODES = {"population": (), "sequential": ("--population-size", "1")}
PHASE_GROUPS = {
    "training_s": ("original", "retrain"),
    "unlearning_s": ("camu",),
    "evaluation_s": ("evaluation",),
    "relearning_s": ("relearn",),
}
MEASURES = ("wall_s", "compile_s", "phases_s", *PHASE_GROUPS)


class StudyError(RuntimeError):
    """A study subprocess failed; the message carries the end of its output."""


def study_args(
    dataset: str, seeds, manual_dir: str | Path | None, extra: list[str] | tuple = ()
) -> list[str]:
    """The study's flags for `experiments.unlearn`: every class of `dataset` forgotten in turn,
    for every seed; `extra` comes last, so its flags override these."""
    args = ["--dataset", dataset, "--scenario", "class", "--forget-class", "all"]
    args += ["--seeds", ",".join(str(s) for s in seeds)]
    if manual_dir is not None:
        args += ["--manual-dir", str(manual_dir)]
    return args + list(extra)


def split_extra(text: str) -> list[str]:
    """`--study-args` text -> argument list."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise ValueError(f"--study-args {text!r}: {e}") from None


def resolve(args: list[str]):
    """The `ExperimentConfig` that `experiments.unlearn` makes of `args`, checked here so that
    a bad flag or value fails before anything runs; raises ValueError naming it."""
    from ..cli import config_from_args
    from ..unlearn import build_parser

    for a in args:
        if a.split("=", 1)[0] in MANAGED_FLAGS:
            raise ValueError(f"--study-args: {a.split('=', 1)[0]} is set by the benchmark")
    parser = build_parser()
    parser.allow_abbrev = False  # an abbreviated managed flag must not slip through

    def fail(message):
        raise ValueError(f"--study-args: {message}")

    parser.error = fail
    ns = parser.parse_args(args)
    try:
        config = config_from_args(ns)
    except ValueError as e:
        raise ValueError(f"study: {e}") from None
    # The PyTorch side of the study (`reference_study`) runs the port's CNN on MNIST-like data.
    if config.dataset not in STUDY_DATASETS:
        raise ValueError(
            f"--study-args: dataset {config.dataset!r}; the study benchmark covers "
            f"{', '.join(STUDY_DATASETS)}"
        )
    if config.model != "cnn":
        raise ValueError(f"--study-args: model {config.model!r}; the study benchmark covers cnn")
    return config


def command(mode: str, args: list[str], workdir: Path, cache: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        f"{EXPERIMENTS}.unlearn",
        "--no-progress",
        "--workdir",
        str(workdir),
        "--xla-cache",
        str(cache),
        *args,
        *MODES[mode],
    ]


def summarize(phases: list[dict], wall: float) -> dict:
    """One run's measures from its results.json `phases` (None for a phase it did not run)."""
    seconds = {p["phase"]: p["seconds"] for p in phases}
    out = {
        "wall_s": wall,
        "compile_s": sum(p["compile_seconds"] for p in phases),
        "phases_s": sum(seconds.values()),
    }
    for key, names in PHASE_GROUPS.items():
        present = [seconds[n] for n in names if n in seconds]
        out[key] = sum(present) if present else None
    return out


def run_once(mode: str, args: list[str], *, log=print) -> dict:
    """One cold run of the study in `mode`; its measures, and what it ran on."""
    with tempfile.TemporaryDirectory(prefix=f"camu_study_{mode}_") as tmp:
        workdir, cache = Path(tmp) / "work", Path(tmp) / "xla-cache"
        cache.mkdir()
        cmd = command(mode, args, workdir, cache)
        log(f"[benchmark] study.{mode}: {shlex.join(cmd[1:])}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise StudyError(f"the {mode} study run failed (exit {proc.returncode}): {tail}")
        results = json.loads((workdir / "results.json").read_text())
    out = summarize(results["phases"], wall)
    out.update(
        phases=results["phases"],
        population_size=results["config"]["population_size"],
        mesh=results["mesh"],
        devices=len(results["devices"]),
    )
    log(f"[benchmark]   {json.dumps({k: out[k] for k in MEASURES})}")
    return out


def _median(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return median(present) if present else None


def bench_study(args: list[str], *, repeats: int = 1, log=print) -> dict:
    """Both modes, alternated `repeats` times; medians per mode, and population / sequential."""
    config = resolve(args)
    runs = len(config.seeds) * len(config.forget_specs())
    times = alternate({m: functools.partial(run_once, m, args, log=log) for m in MODES}, repeats)
    out = {
        "args": list(args),
        "dataset": config.dataset,
        "model": config.model,
        "scenario": config.scenario,
        "seeds": list(config.seeds),
        "counts": {
            "originals": len(config.seeds),
            "retrains": runs,
            "camu": runs,
            "evaluations": 3 * runs,
            "relearning": 2 * runs if config.relearn else 0,
        },
        "original_epochs": config.original_epochs,
        "camu_epochs": config.camu_config().epochs,
        "repeats": repeats,
        "modes": {m: list(flags) for m, flags in MODES.items()},
    }
    for mode, results in times.items():
        out[mode] = {k: _median([r[k] for r in results]) for k in MEASURES}
        out[mode]["runs"] = results
    pop, seq = out["population"], out["sequential"]
    out["population_over_sequential"] = {
        k: pop[k] / seq[k] if pop[k] is not None and seq[k] else None for k in MEASURES
    }
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--study-dataset",
        choices=STUDY_DATASETS,
        default="digits",
        help="--only study: the study's dataset (default digits; mnist reads --mnist-dir or "
        "--study-manual-dir)",
    )
    parser.add_argument(
        "--study-seeds",
        default=",".join(map(str, DEFAULT_SEEDS)),
        help="--only study: comma-separated seeds (default 0,1; the full MNIST study: 0,1,2,3,4)",
    )
    parser.add_argument(
        "--study-manual-dir",
        type=Path,
        default=None,
        help="--only study: the dataset's source files (default for mnist: --mnist-dir)",
    )
    parser.add_argument(
        "--study-repeats",
        type=int,
        default=1,
        help="--only study: runs per mode, alternated; medians reported (default 1)",
    )
    parser.add_argument(
        "--study-args",
        default="",
        help="--only study: further flags for python -m experiments.unlearn, given last "
        "(e.g. '--original-epochs 1 --no-relearn --forget-class 0')",
    )


def args_from_cli(ns: argparse.Namespace) -> list[str]:
    """The study's `experiments.unlearn` flags from the benchmark's flags; ValueError naming a
    bad one."""
    if ns.study_repeats < 1:
        raise ValueError(f"--study-repeats {ns.study_repeats}: must be at least 1")
    try:
        seeds = [int(s) for s in ns.study_seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(
            f"--study-seeds {ns.study_seeds!r}: expected integers like 0,1,2"
        ) from None
    manual = ns.study_manual_dir
    if manual is not None and not manual.is_dir():
        raise ValueError(f"--study-manual-dir {manual} is not a directory")
    if manual is None and ns.study_dataset == "mnist" and ns.mnist_dir.is_dir():
        manual = ns.mnist_dir
    args = study_args(ns.study_dataset, seeds, manual, split_extra(ns.study_args))
    resolve(args)
    return args
