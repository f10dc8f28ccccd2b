"""Tests for experiments.reporting and the ``python -m experiments.report`` entry point."""

import copy
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import reporting

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "results_small.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CSV_COLUMNS = (
    "dataset scenario forget_class seed method n_forget UA RA TA mia_efficacy avg_gap rte "
    "seconds remain_train_acc forget_train_acc test_acc test_remain_acc test_forget_acc mia "
    "loss_attack"
).split()


@pytest.fixture()
def results():
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build of the fixture's reports, shared by the read-only checks below."""
    workdir = tmp_path_factory.mktemp("report")
    written = reporting.build_reports(json.loads(FIXTURE.read_text()), workdir)
    return workdir, written


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and data.endswith(b"IEND\xaeB`\x82") and len(data) > 1000


def test_build_reports_writes_every_file(built):
    tmp_path, written = built
    names = {p.name for p in written}
    assert names == {"results.csv", "results.md", "per_class_accuracy.png", "relearning.png"}
    assert all(p.parent == tmp_path for p in written)
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert _is_png(tmp_path / "per_class_accuracy.png")
    assert _is_png(tmp_path / "relearning.png")


def test_csv_has_one_row_per_run_and_method(results, built):
    tmp_path, _ = built
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 3  # classes x seeds x methods
    for column in CSV_COLUMNS:
        assert column in rows[0], column
    assert [r["method"] for r in rows[:3]] == ["original", "retrain", "camu"]
    assert rows[0]["rte"] == ""  # null stays empty, not "None"
    camu = next(r for r in rows if r["method"] == "camu")
    run0 = results["runs"][0]["methods"]["camu"]
    assert float(camu["UA"]) == run0["UA"] and camu["dataset"] == "mnist"


def test_markdown_tables(results, built):
    tmp_path, _ = built
    md = (tmp_path / "results.md").read_text()
    assert "| Retrain |" in md and "| CaMU |" in md and "±" in md
    assert "Avg. Gap" in md and "MIA-efficacy" in md and "Retrain row is the target" in md
    assert md.index("| Original |") < md.index("| Retrain |") < md.index("| CaMU |")
    assert "Per forgotten class" in md and "| 1 | CaMU |" in md
    # CaMU UA over the four runs: mean of the fixture values, population std.
    ua = [r["methods"]["camu"]["UA"] for r in results["runs"]]
    mean = sum(ua) / len(ua)
    std = (sum((u - mean) ** 2 for u in ua) / len(ua)) ** 0.5
    assert f"| CaMU | {mean:.2f} ± {std:.2f} |" in md


def test_summarize_matches_fixture_and_skips_none(results):
    summary = reporting.summarize(results["runs"])
    assert list(summary) == ["original", "retrain", "camu"]
    for method, metrics in results["summary"].items():
        for key, stats in metrics.items():
            assert summary[method][key]["mean"] == pytest.approx(stats["mean"], abs=1e-5)
            assert summary[method][key]["std"] == pytest.approx(stats["std"], abs=1e-5)
    assert "rte" not in summary["original"]  # all null
    runs = copy.deepcopy(results["runs"])
    runs[0]["methods"]["camu"]["rte"] = None
    rest = [r["methods"]["camu"]["rte"] for r in runs[1:]]
    assert reporting.summarize(runs)["camu"]["rte"]["mean"] == pytest.approx(sum(rest) / 3)


def test_random_removal_without_relearning(results, tmp_path):
    results["scenario"] = "random"
    for run in results["runs"]:
        run["forget_class"] = None
        run.pop("relearn")
        run["methods"]["camu"]["test_forget_acc"] = None
        run["methods"]["my_method"] = dict(run["methods"]["camu"])  # unknown to reporting
    written = reporting.build_reports(results, tmp_path)
    assert "relearning.png" not in {p.name for p in written}
    assert _is_png(tmp_path / "per_class_accuracy.png")
    md = (tmp_path / "results.md").read_text()
    assert "Per forgotten class" not in md and "| my_method |" in md
    assert md.index("| CaMU |") < md.index("| my_method |")


def test_build_reports_rejects_bad_layout(tmp_path):
    with pytest.raises(ValueError, match="runs"):
        reporting.build_reports({"runs": []}, tmp_path)


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.report", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_rebuilds_reports(tmp_path):
    (tmp_path / "results.json").write_text(FIXTURE.read_text())
    proc = _run_cli(str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "results.md").is_file() and _is_png(tmp_path / "relearning.png")
    assert str(tmp_path / "results.csv") in proc.stdout


def test_cli_missing_results_fails_cleanly(tmp_path):
    missing = tmp_path / "nowhere"
    proc = _run_cli(str(missing))
    assert proc.returncode == 2
    assert str(missing / "results.json") in proc.stderr
    assert "Traceback" not in proc.stderr


# -- stale temp files of the atomic writer ------------------------------------------------------


def _killed_during_write(target: Path) -> Path:
    """Runs atomic_write_bytes in a child killed (SIGKILL) just before its os.replace; returns
    the temp file it left behind."""
    code = (
        "import os, signal, sys; from experiments import reporting; "
        "reporting.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL); "
        "reporting.atomic_write_bytes(sys.argv[1], b'half')"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=ROOT, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    (left,) = target.parent.glob(f".{target.name}.*.tmp")
    return left


def test_remove_stale_temp_files_takes_only_the_writers_dead_temp_files(tmp_path):
    (tmp_path / "results.json").write_text("previous")
    killed = _killed_during_write(tmp_path / "results.json")
    old_naming = tmp_path / ".results.json.k3j4h5g6.tmp"  # Before the pid and host were added.
    live = tmp_path / f".results.csv.tmp-{os.getpid()}-{reporting._HOST}-abcd1234.tmp"
    dead_pid = killed.name.split("-")[1]
    host = next(h for h in ("0123abcd", "4567cdef") if h != reporting._HOST)
    other_host = tmp_path / f".results.md.tmp-{dead_pid}-{host}-abcd1234.tmp"
    kept = [
        live,  # This process is alive: a concurrent writer's file in flight.
        other_host,  # A dead pid here, but its writer ran elsewhere: cannot be checked.
        tmp_path / "notes.tmp",
        tmp_path / ".results.json.tmp",
        tmp_path / ".results.json.k3j4h5g6.tmp.bak",
        tmp_path / ".results.json.TOOLONG99.tmp",
    ]
    for path in [old_naming, *kept]:
        path.write_text("x")
    (tmp_path / ".dir.k3j4h5g6.tmp").mkdir()  # Only regular files go.
    (tmp_path / ".link.k3j4h5g6.tmp").symlink_to(tmp_path / "notes.tmp")

    removed = reporting.remove_stale_temp_files(tmp_path, tmp_path / "absent")
    assert sorted(removed) == sorted([killed, old_naming])
    assert not killed.exists() and not old_naming.exists()
    assert all(path.exists() for path in kept)
    assert (tmp_path / ".dir.k3j4h5g6.tmp").is_dir()
    assert (tmp_path / ".link.k3j4h5g6.tmp").is_symlink()
    assert (tmp_path / "results.json").read_text() == "previous"
