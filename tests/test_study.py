"""A study as populations: population and sequential mode agree, and waves compile once.

The population-vs-sequential bound is the issue's acceptance bound, 0.5 accuracy points, on the
study's mean accuracies. Per run it cannot hold on digits: the two modes differ in summation
order (a grouped or patch-matrix convolution instead of one per run), which float32 rounding
turns into different borderline predictions, and one of digits' ~143 forget images is 0.7
points. Over the 10 runs of a study the mean moves by a tenth of that per flipped image.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.configs import ExperimentConfig
from experiments.run import run_experiment

ROOT = Path(__file__).resolve().parents[1]
ACCURACIES = ("remain_train_acc", "forget_train_acc", "test_acc", "test_remain_acc")
COMMON = (
    "--no-progress", "--forget-class", "all", "--seeds", "0", "--original-epochs", "3",
    "--no-relearn",
)  # fmt: skip


def _study(workdir: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.unlearn", "--workdir", str(workdir), *COMMON, *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((workdir / "results.json").read_text())


@pytest.mark.slow
def test_population_and_sequential_studies_agree(tmp_path):
    population = _study(tmp_path / "population")
    sequential = _study(tmp_path / "sequential", "--population-size", "1")
    assert population["config"]["population_size"] is None
    assert sequential["config"]["population_size"] == 1
    assert len(population["runs"]) == len(sequential["runs"]) == 10
    for method in ("original", "retrain", "camu"):
        for key in ACCURACIES:
            a = population["summary"][method][key]["mean"]
            b = sequential["summary"][method][key]["mean"]
            assert abs(a - b) <= 0.5, (method, key, a, b)


def _config(tmp_path, name, classes, population_size):
    return ExperimentConfig(
        dataset="digits",
        forget_classes=tuple((c,) for c in classes),
        original_epochs=1,
        relearn=False,
        population_size=population_size,
        workdir=str(tmp_path / name),
        progress=False,
        eval_workers=1,
    )


def test_waves_and_studies_reuse_every_program(tmp_path):
    # Two runs in one wave compile each phase's programs; four runs in two waves of two, and
    # then another study of other classes, compile nothing new.
    first = run_experiment(_config(tmp_path, "a", (0, 1), 2), log=lambda *_: None)
    assert sum(p["programs_compiled"] for p in first["phases"]) > 0
    second = run_experiment(_config(tmp_path, "b", (2, 3, 4, 5), 2), log=lambda *_: None)
    compiled = {p["phase"]: p["programs_compiled"] for p in second["phases"]}
    assert compiled["retrain"] == 0 and compiled["camu"] == 0, compiled
    cfg = dataclasses.replace(_config(tmp_path, "c", (6, 7), 2), seeds=(1,))
    third = run_experiment(cfg, log=lambda *_: None)
    assert all(p["programs_compiled"] == 0 for p in third["phases"]), third["phases"]
