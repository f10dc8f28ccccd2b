"""The main job end to end on digits, its outputs, determinism and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METRICS = (
    "remain_train_acc",
    "forget_train_acc",
    "test_acc",
    "test_remain_acc",
    "test_forget_acc",
    "mia",
    "seconds",
)


def run_main(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "experiments.unlearn", "--no-progress", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("default")
    proc = run_main("--workdir", str(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc.stdout


def test_default_job_writes_results(default_run):
    workdir, stdout = default_run
    results = json.loads((workdir / "results.json").read_text())
    assert results["dataset"] == "digits" and results["config"]["model"] == "cnn"
    (run,) = results["runs"]
    assert run["seed"] == 0 and run["forget_class"] == 0
    assert run["split_sizes"]["forget"] == run["split_sizes"]["sample"] > 0
    for method in ("original", "retrain", "camu"):
        for key in METRICS:
            assert key in run["methods"][method], (method, key)
        assert method in results["summary"]
        assert set(results["summary"][method]["test_acc"]) == {"mean", "std"}
    m = run["methods"]
    # Retrain never saw class 0; the original did; CaMU must move toward retrain on D_f.
    assert m["retrain"]["forget_train_acc"] < 5
    assert m["original"]["forget_train_acc"] > 95
    assert m["camu"]["forget_train_acc"] < m["original"]["forget_train_acc"] - 40
    assert m["camu"]["test_remain_acc"] > m["original"]["test_remain_acc"] - 10
    assert (workdir / run["split_file"]).exists()
    for method in ("camu", "retrain"):  # the relearning check, recorded every 100 batches
        curve = run["relearn"][method]
        assert curve["batches"][0] == 0 and len(curve["batches"]) == len(curve["gap"]) >= 2
        assert all(b > a for a, b in zip(curve["batches"], curve["batches"][1:], strict=False))
    for name in ("results.csv", "results.md", "per_class_accuracy.png", "relearning.png"):
        assert (workdir / name).exists(), name
    for method in ("original", "retrain", "camu"):
        assert method in stdout
    assert "phases:" in stdout


def test_second_run_restores_trained_models(default_run):
    workdir, stdout = default_run
    assert f"work dir: {workdir}\n" in stdout
    # The same study again (another one is refused there: tests/test_output_paths.py).
    proc = run_main("--workdir", str(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = json.loads((workdir / "results.json").read_text())["phases"]
    assert phases[0]["restored"] is True


def _metrics(workdir):
    runs = json.loads((workdir / "results.json").read_text())["runs"]
    return [
        {
            m: {k: v for k, v in r.items() if "seconds" not in k and not k.startswith("rte")}
            for m, r in run["methods"].items()
        }
        for run in runs
    ]


def test_same_seed_same_results(tmp_path):
    common = (
        "--original-epochs",
        "1",
        "--no-relearn",
        "--scenario",
        "random",
        "--forget-fraction",
        "0.2",
        "--seeds",
        "3",
    )
    for name in ("a", "b"):
        proc = run_main("--workdir", str(tmp_path / name), *common)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--dataset", "imagenet"), "imagenet"),
        (("--model", "vgg"), "vgg"),
        (("--forget-class", "10"), "forget class 10"),
        (("--forget-class", "-1"), "forget class -1"),
        (("--scenario", "random", "--forget-fraction", "1.5"), "1.5"),
        (("--scenario", "random", "--forget-fraction", "0"), "fraction 0"),
        (("--scenario", "sideways"), "sideways"),
        (("--batch-size", "0"), "batch size"),
        (("--dataset", "mnist", "--manual-dir", "/nonexistent/mnist"), "/nonexistent/mnist"),
    ],
)
def test_bad_input_names_the_value_and_writes_nothing(tmp_path, args, needle):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    (workdir / "results.json").write_text('{"keep": true}')
    proc = run_main("--workdir", str(workdir), "--original-epochs", "1", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr
    assert (workdir / "results.json").read_text() == '{"keep": true}'
    assert sorted(p.name for p in workdir.iterdir()) == ["results.json"]


@pytest.mark.parametrize(
    ("indices", "needle"),
    [("", "empty"), ("5\n99999\n", "99999"), ("4\n4\n", "duplicated")],
)
def test_bad_forget_indices(tmp_path, indices, needle):
    f = tmp_path / "idx.txt"
    f.write_text(indices)
    proc = run_main(
        "--workdir",
        str(tmp_path / "wd"),
        "--original-epochs",
        "1",
        "--no-relearn",
        "--scenario",
        "indices",
        "--forget-indices",
        str(f),
    )
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert not (tmp_path / "wd").exists()  # refused before training or writing anything


def test_nan_loss_is_recorded_or_stops_with_clear_error(tmp_path):
    args = ("--original-epochs", "1", "--no-relearn", "--impair-lr", "1e38")
    proc = run_main("--workdir", str(tmp_path / "wd"), *args, "--on-divergence", "stop")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "non-finite loss" in proc.stderr and "camu" in proc.stderr
    assert not (tmp_path / "wd" / "results.json").exists()
    # The default records it: the study finishes, CaMU's cells say diverged, naming the loss.
    proc = run_main("--workdir", str(tmp_path / "wd"), *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: camu diverged on 1 of 1 runs" in proc.stdout
    results = json.loads((tmp_path / "wd" / "results.json").read_text())
    assert results["runs"][0]["methods"]["camu"]["diverged"].startswith("non-finite loss")


def test_methods_flag_reports_every_method(tmp_path):
    """`--methods`: each named method runs, is evaluated and relearned, and appears in
    results.json (metrics, gaps to Retrain, RTE, run and compile seconds), results.csv,
    results.md and the relearning plot beside original and retrain."""
    names = ("camu", "ft", "ssd", "salun")
    proc = run_main(
        "--workdir", str(tmp_path), "--original-epochs", "1", "--methods", ",".join(names)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    (run,) = results["runs"]
    assert set(run["methods"]) == {"original", "retrain", *names}
    for name in names:
        entry = run["methods"][name]
        for key in (*METRICS, "avg_gap", "rte", "compile_seconds", "UA", "mia_efficacy"):
            assert key in entry, (name, key)
        assert entry["seconds"] > 0 and entry["rte"] > 0
        assert name in results["summary"] and name in run["relearn"]
        assert name in results["method_configs"]
    assert {p["phase"] for p in results["phases"]} >= {"original", "retrain", *names}
    csv_text = (tmp_path / "results.csv").read_text()
    md = (tmp_path / "results.md").read_text()
    for shown in ("CaMU", "FT", "SSD", "SalUn"):
        assert shown in md, shown
    for name in names:
        assert name in csv_text, name
    assert (tmp_path / "relearning.png").exists() and (tmp_path / "per_class_accuracy.png").exists()
