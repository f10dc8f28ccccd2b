"""Honest times: every model's seconds split into compiling and running, members of one
population measured apart (by the steps each ran), and RTE from run seconds."""

import time

import jax
import numpy as np
import pytest

from camu_jax import methods, metrics, results, sharding
from camu_jax.data import ForgetSpec, load_dataset, make_splits
from camu_jax.data.pipeline import DeviceData, InputSpec
from camu_jax.models import create_model, init_variables
from camu_jax.study import Run, run_study
from camu_jax.training import TrainConfig, train_population


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits", progress=False)
    mesh = sharding.make_mesh()
    train = DeviceData.put(d.train_images, d.train_labels, spec=InputSpec(), mesh=mesh)
    test = DeviceData.put(d.test_images, d.test_labels, spec=InputSpec(), mesh=mesh)
    return d, train, test


def test_rte_is_from_run_seconds():
    entries = {
        "original": {"UA": 0.0, "RA": 1.0, "TA": 1.0, "mia_efficacy": 0.0, "seconds": 9.0},
        "retrain": {"UA": 1.0, "RA": 1.0, "TA": 1.0, "mia_efficacy": 1.0, "seconds": 6.0},
        "camu": {"UA": 1.0, "RA": 1.0, "TA": 1.0, "mia_efficacy": 1.0, "seconds": 5.0},
    }
    for name, run_s in (("original", 8.0), ("retrain", 5.5), ("camu", 1.1)):
        entries[name]["run_seconds"] = run_s
        entries[name]["compile_seconds"] = entries[name]["seconds"] - run_s
    metrics.add_gaps(entries)
    # The method compiled its own program; Retrain reused the original's.
    assert entries["camu"]["rte"] == pytest.approx(5.5 / 1.1)
    assert entries["camu"]["rte_with_compile"] == pytest.approx(6.0 / 5.0)
    assert entries["retrain"]["rte"] == 1.0
    assert entries["original"]["rte"] is None and entries["original"]["rte_with_compile"] is None
    # Records without the split (older results) keep RTE of `seconds`.
    old = {"retrain": {"seconds": 4.0}, "ft": {"seconds": 2.0}}
    for e in old.values():
        e.update(UA=0.0, RA=0.0, TA=0.0, mia_efficacy=0.0)
    metrics.add_gaps(old)
    assert old["ft"]["rte"] == 2.0 and "rte_with_compile" not in old["ft"]


def test_members_with_more_steps_get_more_seconds(digits):
    """One wave of two members: one trains on all 1437 items, one on 300 (45 and 10 steps an
    epoch). Each gets its own share, compiling split equally; the shares add up to the
    phase's wall time."""
    d, train, _ = digits
    model = create_model("cnn", num_classes=10)
    variables = [init_variables(model, jax.random.key(s), (8, 8, 1)) for s in (0, 1)]
    start = time.perf_counter()
    out = train_population(
        model,
        variables,
        data=train,
        items=[np.arange(train.size), np.arange(300)],
        seeds=[0, 1],
        config=TrainConfig(epochs=2),
        population_size=2,
        progress=False,
    )
    wall = time.perf_counter() - start
    (_, big), (_, small) = out
    assert big["steps"] == 90 and small["steps"] == 20
    assert big["compile_seconds"] == small["compile_seconds"]
    for info in (big, small):
        assert info["seconds"] == pytest.approx(info["run_seconds"] + info["compile_seconds"])
    assert big["run_seconds"] > small["run_seconds"] > 0
    total = big["seconds"] + small["seconds"]
    assert 0.5 * wall < total <= wall
    assert [e["epoch"] for e in big["epochs"]] == [1, 2] and big["epochs"][0]["steps"] == 45


def test_study_times_differ_where_members_differ(digits):
    """Two runs of one study: class 0 forgotten, and classes 0, 1 and 2 together. Their
    retrains and CaMU runs run different numbers of steps in one population each, so their
    seconds differ (no "± 0.00"); RTE is Retrain's run seconds over CaMU's."""
    d, train, test = digits
    runs = [
        Run(
            0,
            make_splits(
                d.train_labels, ForgetSpec(kind="class", classes=c), seed=0, num_classes=10
            ),
            c,
            f"class{'-'.join(map(str, c))}",
        )
        for c in ((0,), (0, 1, 2))
    ]
    record = run_study(
        create_model("cnn", num_classes=10),
        train=train,
        test=test,
        runs=runs,
        methods=[methods.get("camu", dataset="digits")],
        train_config=TrainConfig(epochs=1),
        num_classes=10,
        eval_workers=1,
        progress=False,
        log=None,
    )
    entries = [r["methods"] for r in record["runs"]]
    for m in ("original", "retrain", "camu"):
        for e in entries:
            assert e[m]["seconds"] == pytest.approx(e[m]["run_seconds"] + e[m]["compile_seconds"])
    for m in ("retrain", "camu"):
        a, b = (e[m]["run_seconds"] for e in entries)
        assert a != b, m
        summary = record["summary"][m]["seconds"]
        assert summary["std"] > 0
        # The cell shows that spread (rounded to its two decimals: a spread under 5 ms reads
        # 0.00 there, rightly), not a copy of one wave's time.
        cell = results.cell(record["runs"], m, "seconds")
        assert cell == f"{summary['mean']:.2f} ± {summary['std']:.2f}", cell
    for e in entries:
        assert e["camu"]["rte"] == pytest.approx(
            e["retrain"]["run_seconds"] / e["camu"]["run_seconds"]
        )
        assert e["camu"]["rte_with_compile"] == pytest.approx(
            e["retrain"]["seconds"] / e["camu"]["seconds"]
        )
    # Retrain forgets 3 classes in the second run: fewer steps than in the first.
    steps = [r["losses"]["retrain"][0]["steps"] for r in record["runs"]]
    assert steps[0] > steps[1]
