"""Every scenario the README lists runs end to end on digits and writes every output file, and
`python -m experiments.report` rebuilds its reports (issue 15 item 2); settings that can never
succeed are refused before anything is written (items 2, 5, 10)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHEAP = ("--no-progress", "--original-epochs", "1", "--camu-epochs", "1")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ("original", "retrain", "camu")
INDICES = (3, 17, 230, 231, 400, 401, 402, 777, 1000, 1001, 1002, 1400)

# name -> (flags, relearning on, expected forget_class of each run)
SCENARIOS = {
    "class": (("--forget-class", "3"), False, [3]),
    "classes_together": (("--forget-class", "0,1"), True, [[0, 1]]),
    "all": (("--forget-class", "all"), False, list(range(10))),
    "random": (("--scenario", "random", "--forget-fraction", "0.1"), False, [None]),
    "proportions": (
        ("--scenario", "proportions", "--forget-proportions", "0.5,0,0,0,0,0,0,0,0,0.2"),
        False,
        [None],
    ),
    "indices": (("--scenario", "indices", "--forget-indices", "{indices}"), False, [None]),
}


def run_module(module, *args):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def labels():
    from camu_jax.data import load_dataset

    return np.asarray(load_dataset("digits", progress=False).train_labels)


@pytest.fixture(scope="module", params=list(SCENARIOS))
def scenario(request, tmp_path_factory):
    name = request.param
    flags, relearn, classes = SCENARIOS[name]
    root = tmp_path_factory.mktemp(name)
    (root / "idx.txt").write_text("\n".join(map(str, INDICES)) + "\n")
    flags = [f.format(indices=root / "idx.txt") for f in flags]
    workdir = root / "wd"
    proc = run_module(
        "experiments.unlearn",
        *CHEAP,
        *(() if relearn else ("--no-relearn",)),
        "--workdir",
        str(workdir),
        *flags,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return name, workdir, relearn, classes


def test_scenario_writes_every_output(scenario, labels):
    name, workdir, relearn, classes = scenario
    results = json.loads((workdir / "results.json").read_text())
    runs = results["runs"]
    assert [r["forget_class"] for r in runs] == classes
    for run in runs:
        assert set(run["methods"]) == set(METHODS)
        for method in METHODS:
            assert "forget_train_acc" in run["methods"][method], (name, method)
        with np.load(workdir / run["split_file"], allow_pickle=False) as split:
            forget, remain = split["forget"], split["remain"]
            assert forget.size == run["split_sizes"]["forget"] > 0
            assert remain.size == run["split_sizes"]["remain"]
            assert forget.size + remain.size == labels.size
            assert not np.isin(forget, remain).any()
        fc = run["forget_class"]
        if fc is not None:  # class removal: D_f is exactly the forgotten classes' items
            group = fc if isinstance(fc, list) else [fc]
            assert np.array_equal(np.sort(forget), np.flatnonzero(np.isin(labels, group)))
        assert bool(run.get("relearn")) == relearn
    if name == "indices":
        assert np.array_equal(np.sort(forget), np.asarray(INDICES))
    if name == "proportions":
        assert set(np.unique(labels[forget])) == {0, 9}
    for method in METHODS:
        assert method in results["summary"]
        folder = workdir / "checkpoints" / method
        assert folder.is_dir() and any(folder.iterdir()), folder
    with open(workdir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(runs) * len(METHODS)
    md = (workdir / "results.md").read_text()
    assert "| CaMU |" in md and "| Retrain |" in md
    if name == "classes_together":
        assert {r["forget_class"] for r in rows} == {"0+1"}
        assert "forgotten classes 0+1" in md
    if name == "all":
        assert md.count("| CaMU |") == 2 + 10  # both overall tables, then one row per class
    pngs = ["per_class_accuracy.png", *(["relearning.png"] if relearn else [])]
    for png in pngs:
        assert (workdir / png).read_bytes().startswith(PNG_MAGIC), png
    assert not (workdir / "relearning.png").exists() or relearn
    leftovers = [p.name for p in workdir.rglob("*.tmp")]
    assert not leftovers, leftovers


def test_report_rebuilds_the_scenarios_reports(scenario):
    _, workdir, relearn, _ = scenario
    before = {n: (workdir / n).read_bytes() for n in ("results.csv", "results.md")}
    for name in ("results.csv", "results.md", "per_class_accuracy.png", "relearning.png"):
        (workdir / name).unlink(missing_ok=True)
    proc = run_module("experiments.report", str(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, data in before.items():
        assert (workdir / name).read_bytes() == data, name
    assert (workdir / "per_class_accuracy.png").is_file()
    assert (workdir / "relearning.png").is_file() == relearn


def written(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--forget-class", "0,0"), ("--forget-class 0,0", "class 0 more than once")),
        (("--forget-class", "2,5,2"), ("--forget-class 2,5,2", "class 2 more than once")),
        (("--seeds", "0,0"), ("--seeds 0,0", "seed 0 more than once")),
        (("--seeds", "4294967296"), ("--seeds 4294967296", "0..4294967295")),
        (("--seeds", "18446744073709551616"), ("--seeds 18446744073709551616",)),
        (("--seeds", "9" * 400), ("--seeds 999",)),
        (("--methods", "camu,camu"), ("--methods camu,camu", "camu more than once")),
        (("--methods", "ft,camu,ft"), ("--methods ft,camu,ft", "ft more than once")),
    ],
)
def test_impossible_settings_are_refused_before_anything_is_written(tmp_path, args, needles):
    workdir = tmp_path / "wd"
    proc = run_module(
        "experiments.unlearn", *CHEAP, "--no-relearn", "--workdir", str(workdir), *args
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert written(workdir) == []
