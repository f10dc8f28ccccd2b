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

from camu_jax.results import TIME_KEYS
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


def _compiled(phase: dict) -> int:
    """Programs XLA compiled for a phase: by the phase, and ahead for it (`compiled_ahead`)."""
    return phase["programs_compiled"] + (phase.get("compiled_ahead") or {}).get(
        "programs_compiled", 0
    )


def test_waves_and_studies_reuse_every_program(tmp_path):
    # Two runs in one wave compile each phase's programs; four runs in two waves of two, and
    # then another study of other classes, compile nothing new.
    first = run_experiment(_config(tmp_path, "a", (0, 1), 2), log=lambda *_: None)
    assert sum(_compiled(p) for p in first["phases"]) > 0
    second = run_experiment(_config(tmp_path, "b", (2, 3, 4, 5), 2), log=lambda *_: None)
    compiled = {p["phase"]: _compiled(p) for p in second["phases"]}
    assert compiled["retrain"] == 0 and compiled["camu"] == 0, compiled
    cfg = dataclasses.replace(_config(tmp_path, "c", (6, 7), 2), seeds=(1,))
    third = run_experiment(cfg, log=lambda *_: None)
    assert all(_compiled(p) == 0 for p in third["phases"]), third["phases"]


TIMES = TIME_KEYS  # every time key of a model's entry (wall clock)
ONE_AT_A_TIME = ("--population-size", "1", "--eval-workers", "1", "--original-epochs", "1")


def _figures(runs: list[dict]) -> list[dict]:
    """Every metric of every run and method, times left out (they differ between runs)."""
    return [
        {
            "methods": {
                m: {k: v for k, v in r.items() if k not in TIMES} for m, r in run["methods"].items()
            },
            "relearn": run.get("relearn"),
        }
        for run in runs
    ]


def test_notebook_compare_and_the_cli_give_the_same_metrics(tmp_path):
    import camu_jax
    from camu_jax import methods
    from camu_jax.data import load_dataset
    from camu_jax.data.pipeline import DeviceData, input_spec_for
    from camu_jax.models import create_model

    cli = _study(
        tmp_path / "cli",
        *ONE_AT_A_TIME,
        "--forget-class", "0", "--relearn", "--methods", "camu,ft",
        "--set", "ft.learning_rate=0.01", "--set", "ft.epochs=2",
    )  # fmt: skip
    d = load_dataset("digits", progress=False)
    spec = input_spec_for("digits", "cnn")
    train = DeviceData.put(d.train_images, d.train_labels, spec=spec)
    test = DeviceData.put(d.test_images, d.test_labels, spec=spec)
    splits = camu_jax.make_splits(
        d.train_labels, camu_jax.ForgetSpec(kind="class", classes=(0,)), seed=0, num_classes=10
    )
    # The main job's CaMU: the preset of (dataset, scenario) with the study's batch.
    camu = dataclasses.replace(camu_jax.camu_preset("digits", "class"), batch_size=32)
    assert dataclasses.asdict(camu) == cli["method_configs"]["camu"]
    notebook = camu_jax.compare(
        create_model("cnn", num_classes=10),
        train=train,
        test=test,
        splits=[splits],
        seeds=[0],
        methods=[
            camu,
            # The study's ft: digits' defaults (batch 16) with the --set values (at digits'
            # batch, 0.05 diverges).
            methods.get("ft", dataset="digits", learning_rate=0.01, epochs=2),
        ],
        train_config=camu_jax.TrainConfig(epochs=1),
        population_size=1,
        eval_workers=1,
        relearning=True,
    )
    assert cli["runs"][0]["methods"]["ft"]["UA"] is not None
    assert _figures(notebook) == _figures(cli["runs"])


def _step_folders(root: Path) -> list[int]:
    """Completed checkpoint steps (Orbax renames `<step>.orbax-checkpoint-tmp-*` to `<step>`)."""
    return [int(p.name) for p in root.glob("*/*") if p.name.isdigit()] if root.exists() else []


def test_a_study_killed_during_a_method_phase_resumes_with_identical_results(tmp_path):
    import os
    import signal
    import time

    epochs = 40
    args = (
        *ONE_AT_A_TIME, "--forget-class", "0", "--methods", "ft", "--set", f"ft.epochs={epochs}",
        "--checkpoint-every", "0",
    )  # fmt: skip
    reference = _study(tmp_path / "reference", *args)
    workdir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "experiments.unlearn", "--workdir", str(workdir), *COMMON, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = workdir / "checkpoints" / "unlearning" / "ft"
    deadline = time.monotonic() + 900
    while not _step_folders(progress):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGSTOP)  # at once: a kill -9 in the middle of the method phase
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = max(_step_folders(progress))
    assert 1 <= done < epochs and not (workdir / "results.json").exists()
    resumed = _study(workdir, *args)
    phase = next(p for p in resumed["phases"] if p["phase"] == "ft")
    assert phase["resumed_members"] == 1
    assert _figures(resumed["runs"]) == _figures(reference["runs"])
