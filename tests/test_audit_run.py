"""The audit's designs, its refusals of bad input, and a tiny end-to-end audit on digits through
`python -m experiments.audit` (4 models, one epoch: the files and their rows, not the values).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import camu_jax
from camu_jax import sharding
from camu_jax.audits import AuditConfig, design
from camu_jax.checks import check_splits
from camu_jax.data.pipeline import DeviceData, InputSpec
from experiments import audit as audit_cli

ROOT = Path(__file__).resolve().parents[1]


def test_camu_jax_audit_is_the_function_and_audits_the_package():
    from camu_jax.audits.run import audit

    assert camu_jax.audit is audit
    assert camu_jax.audits.metrics.klom is camu_jax.audits.klom


def test_ulira_design_pairs_complementary_halves_and_forgets_inside_them():
    n, models = 101, 6
    d = design.ulira_design(n, models=models, forget_fraction=0.2, seed=3)
    assert np.all(d.trained.sum(0) == models // 2)  # every example IN for half the models
    for k in range(models // 2):
        assert np.all(d.trained[2 * k] ^ d.trained[2 * k + 1])
    assert not np.any(d.forgot & ~d.trained)
    data = DeviceData.put(
        np.zeros((n, 2, 2, 1), np.uint8),
        np.zeros(n, np.int32),
        spec=InputSpec(),
        mesh=sharding.make_mesh(),
    )
    check_splits(d.splits, data)  # forget + remain + held out = the data, D_s inside D_r
    for i, sp in enumerate(d.splits):
        assert sp.forget.size == round(0.2 * d.trained[i].sum()) == d.forgot[i].sum()
        assert np.array_equal(np.sort(np.r_[sp.forget, sp.remain]), np.flatnonzero(d.trained[i]))
    again = design.ulira_design(n, models=models, forget_fraction=0.2, seed=3)
    assert np.array_equal(again.forgot, d.forgot) and again.seeds == d.seeds
    assert all(0 <= s < 2**31 for s in d.seeds) and len(set(d.seeds)) == models


def test_forget_design_shares_one_forget_set_and_keeps_oracle_seeds_apart():
    labels = np.arange(200) % 10
    d = design.forget_design(
        labels, models=4, forget_fraction=0.1, classes=None, seed=0, num_classes=10
    )
    assert d.forget.size == 20 and all(np.array_equal(s.forget, d.forget) for s in d.splits)
    assert not set(d.original_seeds) & set(d.oracle_seeds)
    c = design.forget_design(
        labels, models=4, forget_fraction=0.1, classes=(3,), seed=0, num_classes=10
    )
    assert np.array_equal(c.forget, np.flatnonzero(labels == 3))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"metrics": ("ulira", "lira")}, "'lira'"),
        ({"forget_fraction": 0.0}, "forget fraction 0.0"),
        ({"forget_fraction": 1.5}, "forget fraction 1.5"),
        ({"models": 5}, "models 5"),
        ({"models": 0}, "models 0"),
        ({"forget_classes": (3,)}, "class removal (forget classes 3)"),
        ({"forget_classes": (3,), "metrics": ("klom",), "seed": -1}, "seed"),
        ({"variance": "local"}, "'local'"),
    ],
)
def test_audit_config_refuses_bad_values_naming_them(change, named):
    with pytest.raises(ValueError, match=None) as e:
        AuditConfig(**change).validate(10)
    assert named in str(e.value)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--metrics", "ulira,mia"], "unknown metric 'mia'"),
        (["--forget-fraction", "1"], "forget fraction 1.0"),
        (["--forget-fraction", "nan"], "forget fraction nan"),
        (["--models", "7"], "models 7 must be even"),
        (["--models", "1"], "models 1 must be even"),
        (["--forget-class", "2"], "U-LiRA audits random forget sets only"),
        (["--forget-class", "12", "--metrics", "klom"], "forget class 12"),
        (["--methods", "camu,nope"], "unknown method 'nope'"),
        (["--methods", "ft,ft"], "names ft twice"),
        (["--methods", "ft", "--set", "ga.epochs=2"], "ga is not among the audited"),
        (["--methods", "ft", "--set", "ft.learning_rate=0.1,0.2"], "sweeps are not audited"),
        (["--dataset", "svhn"], "unknown dataset 'svhn'"),
    ],
)
def test_command_refuses_bad_input_before_anything_runs(tmp_path, capsys, argv, named):
    code = audit_cli.main([*argv, "--workdir", str(tmp_path / "w")])
    assert code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_tiny_digits_audit_writes_every_file_with_the_floor_and_ceiling_rows(tmp_path):
    work = tmp_path / "audit"
    cmd = [
        sys.executable, "-m", "experiments.audit", "--models", "4", "--original-epochs", "1",
        "--methods", "ft,retrain", "--set", "ft.epochs=1", "--workdir", str(work),
        "--xla-cache", "", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in audit_cli_files():
        assert (work / name).is_file(), name
    record = json.loads((work / "audit.json").read_text())
    assert record["rows"] == ["original", "retrain", "ft"]
    for metric in ("ulira", "klom", "epsilon"):
        assert set(record[metric]["methods"]) == {"original", "retrain", "ft"}
        assert record[metric]["models"] == 4
    assert record["ulira"]["methods"]["original"]["n_positive"] > 0
    for row in ("original", "retrain", "ft"):
        k = record["klom"]["methods"][row]
        assert {"forget", "retain", "test"} <= set(k) and k["forget"]["n"] == 144
        assert 0 <= record["epsilon"]["methods"][row]["forget_score"] <= 1
    assert "python -m experiments.audit --models 4" in record["command"]
    md = (work / "audit.md").read_text()
    for text in ("Original (ceiling)", "Retrain (floor)", "chance (floor)", "N = 4"):
        assert text in md
    arrays = np.load(work / "per_example.npz")
    assert arrays["epsilon/ft"].shape == (144,) and arrays["klom/retrain"].shape == (1797,)


def audit_cli_files():
    from experiments.audit_report import FILES

    return FILES


def test_benchmark_multiplies_the_one_at_a_time_run_out():
    import argparse

    from experiments.benchmark import audit as bench

    ns = argparse.Namespace(
        audit_args="--methods ft --models 8 --workdir /x --population-size=4",
        audit_sequential_models=2,
    )
    assert bench.args_from_cli(ns) == (["--methods", "ft"], 8, 2)
    with pytest.raises(ValueError, match="--audit-sequential-models 3"):
        bench.args_from_cli(argparse.Namespace(audit_args="--models 8", audit_sequential_models=3))
    with pytest.raises(ValueError, match="models 5"):
        bench.args_from_cli(argparse.Namespace(audit_args="--models 5", audit_sequential_models=2))

    def phase(name, seconds, compile_seconds):
        return {"phase": name, "seconds": seconds, "compile_seconds": compile_seconds}

    population = {
        "models": 8,
        "wall_s": 40.0,
        "phases": [phase("train", 20, 5), phase("KLOM", 10, 1)],
    }
    sequential = {
        "models": 2,
        "wall_s": 30.0,
        "phases": [phase("train", 9, 5), phase("KLOM", 3, 1)],
    }
    out = bench.multiplied_out(population, sequential)
    # train: compile once (5) + 4 x the rest (4); KLOM: the population's (placement-free).
    assert out["phases"]["train"] == {"population_s": 20, "one_at_a_time_s": 5 + 4 * 4}
    assert out["phases"]["KLOM"]["one_at_a_time_s"] == 10
    assert out["one_at_a_time_wall_s"] == 21 + 10 + (40 - 30)
    assert out["one_at_a_time_over_population"] == pytest.approx(41 / 40)
