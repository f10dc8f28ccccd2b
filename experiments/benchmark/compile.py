"""What compiling costs the jobs users run: `python -m experiments.benchmark --only compile`
(issue 17, item 7).

Every job runs `python -m experiments.unlearn` as its own processes, one after the other:

* `main` (the digits main job as it runs by default), `all` (`--methods all --no-relearn`) and
  `study` (`--forget-class all --seeds 0,1`) each twice: *cold*, from an empty persistent
  compilation cache (`--xla-cache`), then *warm*, a new process on the cache the cold run
  filled. Both start from an empty work dir, so nothing is restored: the warm run differs from
  the cold one only in what it finds in the cache.
* `tune`: an 8-point learning-rate grid of FT on digits (`--methods ft --no-relearn`). The
  *population* side is one process with `--set ft.learning_rate=LR1,...,LR8` (a sweep: every
  point a member of one population). The *one at a time* side is 8 processes, one per point
  (`--set ft.learning_rate=LR`), in grid order. Both sides are measured the same way: each
  starts from an empty compilation cache and an empty checkpoint dir; the 8 processes share
  theirs (as `experiments.tune` reuses the original: the first point trains the original and
  the retrained model, the later ones restore them, and load what the cache holds); the
  seconds are the processes' wall clocks and their results.json phases, summed over the
  side's processes. Skipped, with the CLI's message, where the CLI refuses a comma list.

Per phase, from each process's results.json (`camu_jax.study`'s phase records): the programs
compiled by XLA, those loaded from the persistent cache, the compile seconds (tracing,
lowering and building) and the run seconds (the phase's seconds minus its compile seconds);
per job, the share of the phases' seconds spent compiling.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .data import EXPERIMENTS, ROOT

JOBS = {
    "main": (),
    "all": ("--methods", "all", "--no-relearn"),
    "study": ("--forget-class", "all", "--seeds", "0,1"),
}
ALL_JOBS = (*JOBS, "tune")
TUNE_METHOD, TUNE_FIELD = "ft", "learning_rate"
TUNE_ARGS = ("--methods", TUNE_METHOD, "--no-relearn")
TUNE_GRID = (0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.03, 0.05)
# The flags each run sets itself; refused in --compile-args.
MANAGED_FLAGS = ("--workdir", "--checkpoint-dir", "--xla-cache", "--progress", "--no-progress")
SCORES = ("forget_train_acc", "remain_train_acc", "test_acc", "mia")


# The checkout whose `experiments.unlearn` the processes run (--compile-checkout; None: this).
CHECKOUT: Path | None = None


class RunError(RuntimeError):
    """A job's process failed; the message carries the end of its output."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile-jobs",
        default=",".join(ALL_JOBS),
        help=f"--only compile: comma-separated subset of {','.join(ALL_JOBS)} (default all)",
    )
    parser.add_argument(
        "--compile-args",
        default="",
        help="--only compile: further flags for every python -m experiments.unlearn process, "
        "given last (e.g. '--original-epochs 1')",
    )
    parser.add_argument(
        "--compile-checkout",
        default=None,
        help="--only compile: run the processes in this checkout (a git worktree of another "
        "commit, for a before/after table on one host in one hour); this checkout's harness "
        "reads their results.json (default: this checkout)",
    )
    parser.add_argument(
        "--compile-tune-grid",
        default=",".join(map(str, TUNE_GRID)),
        help="--only compile: the tune job's FT learning rates (default "
        f"{','.join(map(str, TUNE_GRID))})",
    )


def settings_from_cli(ns: argparse.Namespace) -> dict:
    """`{jobs, extra, grid}` from the benchmark's flags; ValueError naming a bad one."""
    jobs = [j.strip() for j in ns.compile_jobs.split(",") if j.strip()]
    unknown = sorted(set(jobs) - set(ALL_JOBS))
    if unknown or not jobs:
        raise ValueError(
            f"--compile-jobs {ns.compile_jobs!r}: unknown {unknown}; allowed: {','.join(ALL_JOBS)}"
        )
    try:
        extra = shlex.split(ns.compile_args)
    except ValueError as e:
        raise ValueError(f"--compile-args {ns.compile_args!r}: {e}") from None
    for a in extra:
        if a.split("=", 1)[0] in MANAGED_FLAGS:
            raise ValueError(f"--compile-args: {a.split('=', 1)[0]} is set by the benchmark")
    try:
        grid = [float(x) for x in ns.compile_tune_grid.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--compile-tune-grid {ns.compile_tune_grid!r}: expected numbers like 0.01,0.02"
        ) from None
    if len(grid) < 2 or len(set(grid)) != len(grid):
        raise ValueError(f"--compile-tune-grid {ns.compile_tune_grid!r}: two or more values")
    for job in jobs:
        if job != "tune":
            check_args(job_args(job, extra))
    global CHECKOUT
    if ns.compile_checkout is not None:
        CHECKOUT = Path(ns.compile_checkout).resolve()
        if not (CHECKOUT / EXPERIMENTS.split(".")[-1] / "unlearn.py").is_file():
            raise ValueError(f"--compile-checkout {ns.compile_checkout}: no experiments/unlearn.py")
    return {"jobs": jobs, "extra": extra, "grid": grid}


def job_args(job: str, extra=()) -> list[str]:
    return [*JOBS[job], *extra]


def tune_args(grid, extra=()) -> list[str]:
    values = ",".join(map(str, grid))
    return [*TUNE_ARGS, "--set", f"{TUNE_METHOD}.{TUNE_FIELD}={values}", *extra]


def check_args(args: list[str]):
    """The config `experiments.unlearn` makes of `args`; ValueError with the CLI's message."""
    from ..cli import config_from_args
    from ..unlearn import build_parser

    parser = build_parser()
    parser.allow_abbrev = False

    def fail(message):
        raise ValueError(message)

    parser.error = fail
    try:
        return config_from_args(parser.parse_args(args))
    except ValueError as e:
        raise ValueError(f"python -m experiments.unlearn {shlex.join(args)}: {e}") from None


def phase_rows(phases: list[dict]) -> list[dict]:
    """Per phase of a results.json: programs compiled by XLA and loaded from the cache (None
    where the record predates the split), compile and run seconds. Programs compiled for the
    phase ahead, in the study's background thread (`compiled_ahead`), count among its
    programs; their seconds are `ahead_s`, apart from `compile_s` (what the phase itself spent
    compiling: while it waits, nothing else of it runs)."""
    rows = []
    for p in phases:
        ahead = p.get("compiled_ahead") or {}

        def both(key, p=p, ahead=ahead):
            return None if p.get(key) is None else p[key] + ahead.get(key, 0)

        programs = p.get("programs")
        if programs is not None and ahead.get("programs"):
            programs = {
                kind: {
                    n: programs[kind].get(n, 0) + ahead["programs"][kind].get(n, 0)
                    for n in {**programs[kind], **ahead["programs"][kind]}
                }
                for kind in ("compiled", "loaded")
            }
        rows.append(
            {
                "phase": p["phase"],
                "seconds": p["seconds"],
                "compile_s": p["compile_seconds"],
                "run_s": p["seconds"] - p["compile_seconds"],
                "ahead_s": ahead.get("compile_seconds", 0.0),
                "programs_compiled": both("programs_compiled"),
                "programs_loaded": both("programs_loaded"),
                "xla_compile_s": both("xla_compile_seconds"),
                "cache_load_s": both("cache_load_seconds"),
                "programs": programs,
            }
        )
    return rows


def _sum(values):
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def totals(rows: list[dict], wall: float) -> dict:
    """A process's (or a side's) totals over its phase rows; `compile_share` = compile seconds
    / phases' seconds (what the phases waited for); `ahead_s`, the seconds compiled ahead in
    the background thread, beside the phases (on a CPU, on the cores they run on)."""
    phases_s = sum(r["seconds"] for r in rows)
    compile_s = sum(r["compile_s"] for r in rows)
    return {
        "wall_s": wall,
        "phases_s": phases_s,
        "compile_s": compile_s,
        "run_s": phases_s - compile_s,
        "ahead_s": sum(r.get("ahead_s", 0.0) for r in rows),
        "compile_share": compile_s / phases_s if phases_s else None,
        "programs_compiled": _sum(r["programs_compiled"] for r in rows),
        "programs_loaded": _sum(r["programs_loaded"] for r in rows),
    }


def summarize(results: dict, wall: float) -> dict:
    """One process's record: its phase rows and totals."""
    rows = phase_rows(results["phases"])
    return {"phases": rows, "totals": totals(rows, wall)}


def run_process(
    args: list[str], workdir: Path, cache: Path, checkpoints: Path | None = None, *, log=print
) -> dict:
    """`python -m experiments.unlearn ARGS` in a fresh process; its results.json."""
    module = f"{EXPERIMENTS}.unlearn" if CHECKOUT is None else "experiments.unlearn"
    cmd = [sys.executable, "-m", module, "--no-progress"]
    cmd += ["--workdir", str(workdir), "--xla-cache", str(cache)]
    if checkpoints is not None:
        cmd += ["--checkpoint-dir", str(checkpoints)]
    cmd += list(args)
    log(f"[benchmark]   {shlex.join(cmd[1:])}")
    start = time.perf_counter()
    env = None
    if CHECKOUT is not None:  # that checkout's packages first, whatever is installed
        env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    proc = subprocess.run(cmd, cwd=CHECKOUT or ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RunError(f"exit {proc.returncode}: {tail}")
    results = json.loads((workdir / "results.json").read_text())
    results["wall_s"] = wall
    return results


def bench_job(args: list[str], *, run=None, log=print) -> dict:
    """The job cold (empty cache) then warm (that cache again), each a fresh process and an
    empty work dir. `run`: what runs a process (default `run_process`)."""
    run = run or run_process
    out = {"args": list(args)}
    with tempfile.TemporaryDirectory(prefix="camu_compile_") as tmp:
        cache = Path(tmp) / "xla-cache"
        cache.mkdir()
        for state in ("cold", "warm"):
            results = run(args, Path(tmp) / state, cache, log=log)
            out[state] = summarize(results, results["wall_s"])
            log(f"[benchmark]   {state}: {json.dumps(_rounded(out[state]['totals']))}")
    return out


def _points(results: dict) -> dict[float, dict]:
    """`{learning rate: the first run's scores}` of the tuned method in a results.json."""
    run = results["runs"][0]["methods"]
    out = {}
    for name, config in results["method_configs"].items():
        if name == TUNE_METHOD or name.startswith(f"{TUNE_METHOD}["):
            scores = run[name]
            out[float(config[TUNE_FIELD])] = {k: scores.get(k) for k in SCORES}
    return out


def side(records: list[dict]) -> dict:
    """A side of the tune job (one or several processes): every phase row of every process
    (`point` says which process), the totals over all of them and the tuned method's phase."""
    rows, wall = [], 0.0
    for i, results in enumerate(records):
        wall += results["wall_s"]
        rows += [{**r, "process": i} for r in phase_rows(results["phases"])]
    method_rows = [r for r in rows if r["phase"] == TUNE_METHOD]
    return {
        "processes": len(records),
        "phases": rows,
        "totals": totals(rows, wall),
        "method_phase": totals(method_rows, 0.0),
    }


def bench_tune(grid, extra=(), *, run=None, log=print) -> dict:
    """The grid as one population against its points one at a time (module docstring)."""
    run = run or run_process
    grid = list(grid)
    population_args = tune_args(grid, extra)
    out = {
        "grid": {f"{TUNE_METHOD}.{TUNE_FIELD}": grid},
        "population_args": population_args,
        "one_at_a_time_args": [tune_args([v], extra) for v in grid],
        "how": "each side from an empty compilation cache and checkpoint dir; the one at a "
        "time side's processes share theirs, one after the other; seconds summed over a "
        "side's processes",
    }
    try:
        check_args(population_args)
    except ValueError as e:
        out["skipped"] = f"the CLI refuses a comma list in --set: {e}"
        log(f"[benchmark]   tune skipped: {out['skipped']}")
        return out
    with tempfile.TemporaryDirectory(prefix="camu_tune_pop_") as tmp:
        tmp = Path(tmp)
        (tmp / "cache").mkdir()
        population = run(population_args, tmp / "work", tmp / "cache", tmp / "ckpt", log=log)
    with tempfile.TemporaryDirectory(prefix="camu_tune_one_") as tmp:
        tmp = Path(tmp)
        (tmp / "cache").mkdir()
        singles = [
            run(args, tmp / f"work{i}", tmp / "cache", tmp / "ckpt", log=log)
            for i, args in enumerate(out["one_at_a_time_args"])
        ]
    pop_points = _points(population)
    if sorted(pop_points) != sorted(grid):
        raise RunError(
            f"the population run reported {TUNE_METHOD} points {sorted(pop_points)}, "
            f"not the grid {sorted(grid)}"
        )
    one_points = {}
    for results in singles:
        one_points.update(_points(results))
    out["population"], out["one_at_a_time"] = side([population]), side(singles)
    out["one_at_a_time_over_population"] = ratios(out["population"], out["one_at_a_time"])
    out["scores"] = {
        "population": {str(v): pop_points[v] for v in grid},
        "one_at_a_time": {str(v): one_points.get(v) for v in grid},
        "max_abs_difference": score_difference(pop_points, one_points),
    }
    ratio = _rounded(out["one_at_a_time_over_population"])
    log(f"[benchmark]   one at a time / population: {json.dumps(ratio)}")
    return out


def ratios(population: dict, one: dict) -> dict:
    """One at a time / population of the sides' seconds: above 1, the population is faster."""
    pairs = {
        "wall_s": (one["totals"]["wall_s"], population["totals"]["wall_s"]),
        "phases_s": (one["totals"]["phases_s"], population["totals"]["phases_s"]),
        "method_phase_s": (one["method_phase"]["phases_s"], population["method_phase"]["phases_s"]),
        "method_phase_run_s": (one["method_phase"]["run_s"], population["method_phase"]["run_s"]),
    }
    return {k: (a / b if b else None) for k, (a, b) in pairs.items()}


def score_difference(a: dict, b: dict) -> dict:
    """Per score, the largest |a - b| over the points both sides scored (None: none)."""
    out = {}
    for key in SCORES:
        diffs = [
            abs(a[v][key] - b[v][key])
            for v in a
            if v in b and a[v].get(key) is not None and b[v].get(key) is not None
        ]
        out[key] = max(diffs) if diffs else None
    return out


def bench_compile(settings: dict, *, log=print) -> tuple[dict, int]:
    """Every job of `settings` (`settings_from_cli`); the results and the exit status (1 when a
    job's process failed; the other jobs still run)."""
    out, status = {"extra_args": settings["extra"]}, 0
    for job in settings["jobs"]:
        log(f"[benchmark] compile.{job} ...")
        try:
            if job == "tune":
                out[job] = bench_tune(settings["grid"], settings["extra"], log=log)
            else:
                out[job] = bench_job(job_args(job, settings["extra"]), log=log)
        except RunError as e:
            print(f"error: compile.{job}: {e}", file=sys.stderr)
            out[job], status = {"error": str(e)}, 1
    return out, status


def _rounded(d: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def _n(x) -> str:
    return "-" if x is None else str(x)


def _s(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def _print_rows(rows: list[tuple]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print(
            "  ".join(
                c.rjust(w) if j else c.ljust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))


STATE_COLUMNS = ("XLA", "loaded", "compile s", "run s")


def _cells(r: dict | None) -> tuple:
    if r is None:
        return ("",) * len(STATE_COLUMNS)
    return (
        _n(r["programs_compiled"]),
        _n(r["programs_loaded"]),
        _s(r["compile_s"]),
        _s(r["run_s"]),
    )


def print_job(name: str, r: dict) -> None:
    print(f"\ncompile.{name}: python -m experiments.unlearn {shlex.join(r['args'])}".rstrip())
    if "error" in r:
        print(f"  failed: {r['error']}")
        return
    head = ("phase", *(f"cold {c}" for c in STATE_COLUMNS), *(f"warm {c}" for c in STATE_COLUMNS))
    rows = [head]
    warm = {p["phase"]: p for p in r["warm"]["phases"]}
    for p in r["cold"]["phases"]:
        rows.append((p["phase"], *_cells(p), *_cells(warm.get(p["phase"]))))
    rows.append(("all phases", *_cells(r["cold"]["totals"]), *_cells(r["warm"]["totals"])))
    _print_rows(rows)
    c, w = r["cold"]["totals"], r["warm"]["totals"]
    print(
        f"compiling: {_pct(c['compile_share'])} of the phases' seconds cold, "
        f"{_pct(w['compile_share'])} warm; compiled ahead beside them "
        f"{c.get('ahead_s', 0.0):.1f} s cold, {w.get('ahead_s', 0.0):.1f} s warm; "
        f"wall {c['wall_s']:.1f} s cold, {w['wall_s']:.1f} s warm"
    )


def print_tune(r: dict) -> None:
    grid = next(iter(r["grid"].values()))
    print(
        f"\ncompile.tune: {TUNE_METHOD} {TUNE_FIELD} grid of {len(grid)} points "
        f"({','.join(map(str, grid))}), {shlex.join(TUNE_ARGS)}"
    )
    if "skipped" in r:
        print(f"  skipped: {r['skipped']}")
        return
    rows = [
        (
            "side",
            "processes",
            "wall s",
            "phases s",
            "compile s",
            "XLA",
            "loaded",
            f"{TUNE_METHOD} phase s",
            f"{TUNE_METHOD} compile s",
            f"{TUNE_METHOD} XLA",
        )
    ]
    for label, key in (("population", "population"), ("one at a time", "one_at_a_time")):
        s = r[key]
        t, m = s["totals"], s["method_phase"]
        rows.append(
            (
                label,
                str(s["processes"]),
                _s(t["wall_s"]),
                _s(t["phases_s"]),
                _s(t["compile_s"]),
                _n(t["programs_compiled"]),
                _n(t["programs_loaded"]),
                _s(m["phases_s"]),
                _s(m["compile_s"]),
                _n(m["programs_compiled"]),
            )
        )
    _print_rows(rows)
    ratio = r["one_at_a_time_over_population"]
    print(
        "one at a time / population: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items() if v is not None)
    )
    per_point = [("point", f"{TUNE_METHOD} XLA", f"{TUNE_METHOD} loaded", "compile s", "run s")]
    rows_by_process = [p for p in r["one_at_a_time"]["phases"] if p["phase"] == TUNE_METHOD]
    for value, p in zip(grid, rows_by_process, strict=False):
        per_point.append((f"{TUNE_FIELD}={value}", *_cells(p)))
    print(f"one at a time, the {TUNE_METHOD} phase of each process (in grid order):")
    _print_rows(per_point)
    diff = r["scores"]["max_abs_difference"]
    print(
        "scores, largest |population - one at a time| over the points (percent points): "
        + ", ".join(f"{k} {_s(v)}" for k, v in diff.items())
    )
    print(r["how"])


def print_compile(results: dict) -> None:
    for name, r in results.items():
        if name == "extra_args":
            continue
        if "error" in r and "args" not in r:
            print(f"\ncompile.{name}: failed: {r['error']}")
        elif name == "tune":
            print_tune(r)
        else:
            print_job(name, r)
    if results.get("extra_args"):
        print(f"every process also got: {shlex.join(results['extra_args'])}")
    print(
        "XLA: programs compiled by XLA; loaded: programs loaded from the persistent compilation "
        "cache; compile s: tracing, lowering and building; run s: the phase's seconds minus its "
        "compile seconds"
    )
