"""One result schema: metric keys, titles, column sets and method titles live in
`camu_jax.results`, and one formatter prints the notebook's, the CLI's and the reports' tables."""

import importlib
import json
import math

import numpy as np
import pytest

from camu_jax import evaluation, methods, metrics, results
from camu_jax.data import ForgetSpec, make_splits
from experiments import reporting, run

# `camu_jax.compare` is the function; the module:
compare = importlib.import_module("camu_jax.compare")


def test_score_returns_exactly_the_schema_keys():
    rng = np.random.default_rng(0)
    train_labels, test_labels = np.arange(60) % 3, np.arange(30) % 3
    splits = make_splits(
        train_labels, ForgetSpec(kind="class", classes=(0,)), seed=0, num_classes=3
    )
    got = evaluation.score(
        train_logits=rng.normal(size=(60, 3)),
        train_labels=train_labels,
        test_logits=rng.normal(size=(30, 3)),
        test_labels=test_labels,
        splits=splits,
        forget_classes=(0,),
        seed=0,
    )
    assert tuple(got) == results.METRIC_KEYS
    assert evaluation.METRIC_KEYS is results.METRIC_KEYS
    assert set(results.METRIC_KEYS) <= set(results.METRICS)


def test_one_spelling_of_mia_efficacy():
    scores = metrics.unlearning_scores(
        forget_acc=1.0, remain_acc=2.0, test_acc=3.0, mia_efficacy=4.0
    )
    assert tuple(scores) == results.GAP_KEYS == metrics.SCORE_KEYS
    assert compare.GAP_KEYS is results.GAP_KEYS
    assert "mia_efficacy" in results.METRIC_KEYS
    # Every key a run record holds has a title and a unit.
    for key in (*results.METRIC_KEYS, "avg_gap", *results.TIME_KEYS):
        assert results.METRICS[key].title and results.METRICS[key].unit
    for columns in (
        results.SALUN_COLUMNS,
        results.REFERENCE_COLUMNS,
        results.PER_CLASS_COLUMNS,
        results.TABLE_COLUMNS,
        results.RUN_COLUMNS,
        results.TIME_COLUMNS,
    ):
        assert set(columns) <= set(results.METRICS)


def test_every_registered_method_has_its_own_title():
    for name, cls in methods.REGISTRY.items():
        # Its own, not a parent's (SalUn subclasses RL).
        assert isinstance(cls.__dict__.get("title"), str) and cls.title, name
        assert results.method_title(name) == cls.title
    titles = list(results.METHOD_TITLES.values())
    assert len(set(titles)) == len(titles)
    assert set(results.METHOD_TITLES) == {*results.BASELINES, *methods.names()}
    assert results.method_title("retrain") == "Retrain"
    assert results.method_title("not_a_method") == "not_a_method"


def test_titles_are_defined_only_in_results():
    """The other modules use the schema's objects; none holds its own table of titles."""
    assert reporting.METHOD_NAMES is results.METHOD_TITLES
    assert reporting.SALUN_COLUMNS is results.SALUN_COLUMNS
    assert reporting.summarize is results.summarize
    assert compare.table is results.table
    assert not hasattr(run, "format_table") and run.table is results.table
    titles = {t for t in results.METHOD_TITLES.values()} - set(results.METHOD_TITLES)
    for m in results.METRICS.values():
        titles |= {m.title, m.short} - {m.key}
    titles = {t for t in titles if not t.isidentifier()}  # not "test": a word, not a title
    schema = {id(v) for v in vars(results).values()}
    for module in (compare, evaluation, metrics, reporting, run):
        for name, value in vars(module).items():
            if id(value) in schema or not isinstance(value, dict | tuple | list):
                continue
            items = value.items() if isinstance(value, dict) else enumerate(value)
            strings = {s for kv in items for s in kv if isinstance(s, str)}
            strings |= {
                s
                for v in (value.values() if isinstance(value, dict) else value)
                if isinstance(v, tuple)
                for s in v
                if isinstance(s, str)
            }
            assert not strings & titles, f"{module.__name__}.{name} holds titles {strings & titles}"


def _runs():
    """Three runs of a compare-style record: NaN where an attack did not apply, a method that
    diverged on one run."""
    out = []
    for seed in range(3):
        m = {
            name: {
                **dict.fromkeys(results.METRIC_KEYS, 50.0 + seed + i),
                "loss_attack": float("nan"),
                "seconds": 2.0 + i,
            }
            for i, name in enumerate(("original", "retrain", "camu", "ga"))
        }
        if seed == 0:
            m["ga"] = {"diverged": "non-finite loss", "seconds": 1.0}
        metrics.add_gaps(m)
        out.append({"seed": seed, "methods": m})
    return out


def test_one_formatter_for_compare_and_results_json_records():
    runs = _runs()
    # What experiments.run writes: NaN -> null, inside {"runs": [...]}.
    record = json.loads(json.dumps({"runs": run._clean(runs), "dataset": "digits"}))
    assert record["runs"][0]["methods"]["camu"]["loss_attack"] is None
    assert results.table(runs) == results.table(record)
    assert results.table(runs, markdown=True) == results.table(record, markdown=True)
    text = results.table(runs, results.REFERENCE_COLUMNS + results.SALUN_COLUMNS)
    lines = text.splitlines()
    assert lines[0].split()[0] == "method" and "D_r acc" in lines[0] and "AvgGap" in lines[0]
    camu = next(line for line in lines if line.startswith("camu "))
    # UA of camu over seeds: 52, 53, 54: mean 53, population std 0.82; loss attack missing.
    assert "53.00 ± 0.82" in camu and " - " in camu + " "
    ga = next(line for line in lines if line.startswith("ga "))
    assert "54.50 ± 0.50*" in ga and "3.67 ± 1.89 " in ga  # UA 54 and 55; the times of all 3
    assert lines[-1] == "ga diverged on 1 of 3 runs (* = mean of the rest): non-finite loss"
    md = results.table(runs, ("UA",), markdown=True)
    assert "| GA | 54.50 ± 0.50 (2 runs; 1 diverged) |" in md
    # The reports' numbers are the same as the summary's.
    s = results.summarize(record)["camu"]["UA"]
    assert (s["mean"], round(s["std"], 2)) == (53.0, 0.82)


def test_a_run_where_a_method_diverged():
    runs = _runs()[:1]
    text = results.table(runs, results.RUN_COLUMNS, caption="forget 0 seed 0")
    lines = text.splitlines()
    assert lines[0] == "forget 0 seed 0"
    ga = next(line for line in lines if line.startswith("ga ")).split()
    # Every score says so; the time it ran is still known.
    assert ga[1:-1] == ["diverged"] * (len(results.RUN_COLUMNS) - 1) and ga[-1] == "1.00"
    assert lines[-1] == "ga diverged: non-finite loss"
    camu = next(line for line in lines if line.startswith("camu ")).split()
    assert camu[1] == "52.00" and len(camu) == len(results.RUN_COLUMNS) + 1  # one run: no ±
    md = results.table(runs, results.SALUN_COLUMNS, markdown=True)
    assert "| GA | diverged |" in md and "| CaMU | 52.00 ± 0.00 |" in md


def test_missing_values_and_no_runs():
    runs = [{"methods": {"retrain": {"UA": math.nan, "seconds": 1.0}}}]
    line = results.table(runs, ("UA", "seconds")).splitlines()[1]
    assert line.split() == ["retrain", "-", "1.00"]
    assert "| Retrain | – |" in results.table(runs, ("UA",), markdown=True)  # noqa: RUF001
    with pytest.raises(ValueError, match="at least one run"):
        results.table([])


def test_times_split_into_compile_and_run():
    """A method's entry: `seconds` = `compile_seconds` + `run_seconds`; `rte` of the run
    seconds, `rte_with_compile` of `seconds`; the CLI's table of times shows all five, and a
    diverged method's times carry no "*" (they are measured all the same)."""
    assert results.TIME_COLUMNS == (
        "compile_seconds",
        "run_seconds",
        "seconds",
        "rte",
        "rte_with_compile",
    )
    assert set(results.TIME_KEYS) <= set(results.METRIC_ORDER)
    assert results.METRICS["run_seconds"].unit == "s"
    assert results.METRICS["rte_with_compile"].unit == "ratio"
    m = {
        name: {
            **dict.fromkeys(results.METRIC_KEYS, 50.0),
            "seconds": total,
            "run_seconds": run_s,
            "compile_seconds": total - run_s,
        }
        for name, total, run_s in (("original", 3.0, 2.5), ("retrain", 2.0, 2.0), ("ga", 1.5, 0.5))
    }
    metrics.add_gaps(m)
    assert m["ga"]["rte"] == 4.0 and m["ga"]["rte_with_compile"] == pytest.approx(2.0 / 1.5)
    lines = results.table([{"methods": m}], results.TIME_COLUMNS).splitlines()
    assert lines[0].split() == [
        "method",
        "compile",
        "s",
        "run",
        "s",
        "time",
        "s",
        "RTE",
        "RTE+comp",
    ]
    assert lines[3].split() == ["ga", "1.00", "0.50", "1.50", "4.00", "1.33"]
    assert lines[1].split()[-2:] == ["-", "-"]  # the original has no RTE
    m["ga"] = {"diverged": "non-finite loss", **{k: m["ga"][k] for k in results.TIME_COLUMNS}}
    runs = [{"methods": m}, {"methods": {**m, "ga": {**m["ga"], "seconds": 2.5}}}]
    ga = results.cell(runs, "ga", "seconds")
    assert ga == "2.00 ± 0.50"  # members that differ: no "± 0.00", no "*"
    summary = results.summarize(runs)["ga"]
    assert "run_seconds" in summary and "rte_with_compile" in summary
