"""The default placement against one run at a time (`--population-size 1`), on the jobs a CPU
user runs: `python -m experiments.benchmark --out F.json --only placement`.

Per scenario, `python -m experiments.unlearn` twice, back to back in one invocation (each a
cold subprocess: empty work dir and compile cache, `study.run_once`), the default first; the
ratios default / one at a time of the wall seconds and of each phase's seconds are printed. A
ratio above 1 is a default slower than one run at a time: what issue 22 found (6x on the
MNIST job) and what the per-phase placement (`camu_jax.engine.place`) must keep at or below 1.1
for a single run, and below 1 for a study.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import study

# name -> (dataset, seeds, extra flags): the MNIST job of issue 22, the other single-run
# scenarios on MNIST (random 10 %, two classes forgotten together), the embedded default (the
# digits main job), the digits study.
SCENARIOS = {
    "mnist_class0": ("mnist", (0,), ["--forget-class", "0", "--original-epochs", "1"]),
    "mnist_random10": (
        "mnist",
        (0,),
        ["--scenario", "random", "--forget-fraction", "0.1", "--original-epochs", "1"],
    ),
    "mnist_classes01": ("mnist", (0,), ["--forget-class", "0,1", "--original-epochs", "1"]),
    "digits_main": ("digits", (0,), ["--forget-class", "0"]),
    "digits_study": ("digits", (0, 1), []),
}
MNIST_ONLY_FLAGS = ["--no-relearn"]  # the job of issue 22's table
DEFAULT_SCENARIOS = tuple(SCENARIOS)
# The reference's MNIST scenarios end to end (20-epoch original and retrain, CaMU, evaluation;
# the port has no relearning check): the default placement only, beside the PyTorch port's
# times measured in the same invocation (`reference_study.bench_reference`: one epoch of each
# training timed and multiplied by 20, one CaMU run, one evaluation). About 10 minutes each on
# a 2-core CPU: run only when named.
REFERENCE_SCENARIOS = {
    "reference_class0": ("mnist", (0,), ["--forget-class", "0"]),
    "reference_random10": ("mnist", (0,), ["--scenario", "random", "--forget-fraction", "0.1"]),
}
ALL_SCENARIOS = (*SCENARIOS, *REFERENCE_SCENARIOS)


def scenario_args(name: str, mnist_dir: Path | None) -> list[str]:
    dataset, seeds, extra = {**SCENARIOS, **REFERENCE_SCENARIOS}[name]
    manual = mnist_dir if dataset == "mnist" else None
    flags = extra + (MNIST_ONLY_FLAGS if dataset == "mnist" else [])
    return study.study_args(dataset, seeds, manual, flags)


def phase_seconds(run: dict) -> dict[str, float]:
    return {p["phase"]: p["seconds"] for p in run["phases"]}


def bench_placement(names, mnist_dir: Path | None, *, log=print) -> dict:
    """Each scenario of `names` in both modes; per scenario the runs, the placements the
    default chose per phase, and the ratios default / one at a time."""
    out = {}
    for name in names:
        args = scenario_args(name, mnist_dir)
        log(f"[benchmark] placement.{name}")
        if name in REFERENCE_SCENARIOS:
            out[name] = _reference(args, log)
            continue
        runs = {mode: study.run_once(mode, args, log=log) for mode in study.MODES}
        default, one = runs["population"], runs["sequential"]
        d_phases, o_phases = phase_seconds(default), phase_seconds(one)
        ratios = {"wall": default["wall_s"] / one["wall_s"]}
        ratios.update({p: d_phases[p] / o_phases[p] for p in d_phases if o_phases.get(p)})
        out[name] = {
            "args": args,
            "default": default,
            "one_at_a_time": one,
            "placements": {
                p["phase"]: p.get("placement") for p in default["phases"] if p.get("placement")
            },
            "default_over_one_at_a_time": ratios,
        }
        log(f"[benchmark]   default / one at a time: {json.dumps(_rounded(ratios))}")
    return out


def _reference(args: list[str], log) -> dict:
    from .reference_study import bench_reference

    default = study.run_once("population", args, log=log)
    torch = bench_reference(study.resolve(args), log=log)
    groups = ("training_s", "unlearning_s", "evaluation_s", "phases_s")
    ratios = {k: default[k] / torch[k] for k in groups if default.get(k) and torch.get(k)}
    log(f"[benchmark]   camu-jax / PyTorch port: {json.dumps(_rounded(ratios))}")
    return {"args": args, "default": default, "pytorch": torch, "jax_over_pytorch": ratios}


def _rounded(d: dict) -> dict:
    return {k: round(v, 2) for k, v in d.items()}


def print_placement(results: dict) -> None:
    """The table of `bench_placement`'s results: wall and phase seconds of both modes, ratio."""
    for name, r in results.items():
        if "pytorch" in r:
            _print_reference(name, r)
            continue
        d, o = phase_seconds(r["default"]), phase_seconds(r["one_at_a_time"])
        print(f"\nplacement.{name}: {' '.join(r['args'])}")
        print(f"{'':<14}{'default s':>11}{'one-at-a-time s':>17}{'ratio':>8}")
        rows = [("wall", r["default"]["wall_s"], r["one_at_a_time"]["wall_s"])]
        rows += [(p, d[p], o.get(p)) for p in d]
        rows += [("compile", r["default"]["compile_s"], r["one_at_a_time"]["compile_s"])]
        for label, a, b in rows:
            ratio = f"{a / b:>8.2f}" if b else f"{'-':>8}"
            b_text = f"{b:>17.1f}" if b is not None else f"{'-':>17}"
            print(f"{label:<14}{a:>11.1f}{b_text}{ratio}")


def _print_reference(name: str, r: dict) -> None:
    print(f"\nplacement.{name}: {' '.join(r['args'])}")
    print(f"{'':<14}{'camu-jax s':>11}{'PyTorch port s *':>18}{'ratio':>8}")
    for key in ("training_s", "unlearning_s", "evaluation_s", "phases_s"):
        a, b = r["default"].get(key), r["pytorch"].get(key)
        if a is None or b is None:
            continue
        print(f"{key[:-2]:<14}{a:>11.1f}{b:>18.1f}{a / b:>8.2f}")
    print(f"{'wall':<14}{r['default']['wall_s']:>11.1f}")
    print(f"{'compile':<14}{r['default']['compile_s']:>11.1f}")
    print(f"* {r['pytorch']['note']}")
