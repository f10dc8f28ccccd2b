"""The population audit (`python -m experiments.audit`) against the same audit one model at a
time: `python -m experiments.benchmark --out F.json --only audit`.

Two cold runs, one after the other (each its own process, work dir and empty compilation
cache): the audit as asked, in the default placement (populations), and the same audit with
`--population-size 1` on `--audit-sequential-models` models, whose per-model phases (training,
unlearning, phi: each model on its own) are multiplied out to the asked count: compile seconds
once, the rest times models / few. The metric phases do not depend on the placement and are
taken from the population run. Printed: both totals and their ratio, per phase.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .data import EXPERIMENTS, ROOT

DEFAULT_ARGS = (
    "--dataset digits --methods camu,ft,retrain --models 64 --forget-fraction 0.1 "
    "--metrics ulira,klom,epsilon"
)
MANAGED_FLAGS = ("--workdir", "--checkpoint-dir", "--xla-cache", "--population-size", "--models")
METRIC_PHASES = ("U-LiRA: scores", "KLOM", "epsilon")


class AuditError(RuntimeError):
    """An audit subprocess failed; the message carries the end of its output."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--audit-args",
        default=DEFAULT_ARGS,
        help=f"--only audit: flags of python -m experiments.audit (default {DEFAULT_ARGS!r})",
    )
    parser.add_argument(
        "--audit-sequential-models",
        type=int,
        default=4,
        help="--only audit: models of the one-at-a-time run, multiplied out (default 4; even)",
    )


def args_from_cli(ns: argparse.Namespace) -> tuple[list[str], int, int]:
    """(the audit's flags without --models, its model count, the sequential run's count);
    ValueError naming a bad flag or value."""
    from ..audit import build_parser, resolve

    args = shlex.split(ns.audit_args)
    parser = build_parser()
    parser.allow_abbrev = False

    def fail(message):
        raise ValueError(f"--audit-args: {message}")

    parser.error = fail
    resolved = resolve(parser.parse_args(args))
    models = resolved.audit.models
    few = ns.audit_sequential_models
    if few < 2 or few % 2 or few > models:
        raise ValueError(f"--audit-sequential-models {few}: an even count in 2..{models}")
    kept, skip = [], False
    for a in args:  # the benchmark sets these itself
        if skip:
            skip = False
            continue
        if a.split("=", 1)[0] in MANAGED_FLAGS:
            skip = "=" not in a
            continue
        kept.append(a)
    return kept, models, few


def run_once(args: list[str], models: int, extra: tuple[str, ...] = (), *, log=print) -> dict:
    """One cold audit: its wall seconds and phases (from audit.json)."""
    with tempfile.TemporaryDirectory(prefix="camu_audit_bench_") as tmp:
        work, cache = Path(tmp) / "work", Path(tmp) / "xla"
        cache.mkdir()
        cmd = [sys.executable, "-m", f"{EXPERIMENTS}.audit", *args, "--models", str(models)]
        cmd += ["--workdir", str(work), "--xla-cache", str(cache), "--no-progress", *extra]
        log(f"[benchmark] audit: {shlex.join(cmd[1:])}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise AuditError(f"audit failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        record = json.loads((work / "audit.json").read_text())
    return {"wall_s": wall, "models": models, "extra": list(extra), "phases": record["phases"]}


def multiplied_out(population: dict, sequential: dict) -> dict:
    """The sequential run's per-model phases scaled to the population's model count, the
    metric phases the population run's; totals and the ratio sequential / population."""
    scale = population["models"] / sequential["models"]
    pop = {p["phase"]: p for p in population["phases"]}
    rows = {}
    for p in sequential["phases"]:
        name, compile_s = p["phase"], p["compile_seconds"]
        if name in METRIC_PHASES:
            estimate = pop[name]["seconds"]
        else:
            estimate = compile_s + max(p["seconds"] - compile_s, 0.0) * scale
        rows[name] = {"population_s": pop[name]["seconds"], "one_at_a_time_s": estimate}
    pop_total = sum(r["population_s"] for r in rows.values())
    seq_total = sum(r["one_at_a_time_s"] for r in rows.values())
    overhead = population["wall_s"] - sum(p["seconds"] for p in population["phases"])
    return {
        "phases": rows,
        "population_wall_s": population["wall_s"],
        "one_at_a_time_wall_s": seq_total + overhead,
        "phases_population_s": pop_total,
        "phases_one_at_a_time_s": seq_total,
        "one_at_a_time_over_population": (seq_total + overhead) / population["wall_s"],
    }


def bench_audit(args: list[str], models: int, few: int, *, log=print) -> dict:
    population = run_once(args, models, log=log)
    sequential = run_once(args, few, ("--population-size", "1"), log=log)
    out = {
        "args": args,
        "models": models,
        "sequential_models": few,
        "population": population,
        "one_at_a_time": sequential,
        **multiplied_out(population, sequential),
    }
    log(f"[benchmark]   one at a time / population: {out['one_at_a_time_over_population']:.2f}")
    return out


def print_audit(r: dict) -> None:
    print(f"\naudit: python -m experiments.audit {shlex.join(r['args'])} --models {r['models']}")
    print(
        f"one at a time: {r['sequential_models']} models with --population-size 1, per-model "
        f"phases multiplied by {r['models'] / r['sequential_models']:g} (compile once)"
    )
    print(f"{'phase':<24}{'population s':>14}{'one at a time s':>17}{'ratio':>8}")
    for name, p in r["phases"].items():
        a, b = p["population_s"], p["one_at_a_time_s"]
        print(f"{name:<24}{a:>14.1f}{b:>17.1f}{b / a if a else float('nan'):>8.2f}")
    a, b = r["population_wall_s"], r["one_at_a_time_wall_s"]
    print(f"{'wall':<24}{a:>14.1f}{b:>17.1f}{b / a:>8.2f}")
