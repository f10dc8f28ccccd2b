"""A method that diverges for one run is recorded as diverged; the other runs, the study and its
reports go on (`on_divergence="record"`, the main job's default), or the study stops naming it
(`"raise"` / `--on-divergence stop`)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from camu_jax import methods, metrics, sharding
from camu_jax.data import ForgetSpec, input_spec_for, load_dataset, make_splits
from camu_jax.data.pipeline import DeviceData
from camu_jax.evaluation import evaluate
from camu_jax.models import create_model, init_variables
from experiments.reporting import build_reports

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits", progress=False)
    mesh = sharding.make_mesh(jax.devices()[:1])
    spec = input_spec_for("digits", "cnn")
    train = DeviceData.put(data.train_images, data.train_labels, spec=spec, mesh=mesh)
    test = DeviceData.put(data.test_images, data.test_labels, spec=spec, mesh=mesh)
    model = create_model("cnn", num_classes=10)
    healthy = [init_variables(model, jax.random.key(s), train.input_shape) for s in (0, 1)]
    # Finite weights of 1e30 overflow float32 two layers in: the first loss is not finite.
    huge = jax.tree.map(lambda x: np.full_like(x, 1e30), healthy[1])
    splits = make_splits(data.train_labels, ForgetSpec(kind="class", classes=(0,)), seed=0,
                         num_classes=10)  # fmt: skip
    return data, model, train, test, healthy, huge, splits


def _ft(model, originals, train, splits, **kw):
    return methods.run_population(
        methods.get("ft", batch_size=32, epochs=1, learning_rate=0.01),
        model,
        originals,
        data=train,
        splits=[splits] * len(originals),
        seeds=[0, 1],
        num_classes=10,
        names=["run a", "run b"],
        progress=False,
        **kw,
    )


def test_a_diverged_member_is_recorded_and_leaves_the_other_unchanged(digits):
    data, model, train, test, healthy, huge, splits = digits
    # One wave of both (population_size=2), on both sides: the same program (a timed probe
    # could choose another layout for either).
    out = _ft(model, [healthy[0], huge], train, splits, on_divergence="record", population_size=2)
    assert out[1][0] is None
    assert out[1][1]["diverged"].startswith("non-finite loss")
    assert "(run b)" in out[1][1]["diverged"]
    assert "diverged" not in out[0][1]
    # Members never mix: member 0 of a population whose other member is healthy runs the same
    # program on the same inputs, so its result is bit-identical.
    reference = _ft(
        model, [healthy[0], healthy[1]], train, splits, on_divergence="record", population_size=2
    )
    for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(reference[0][0]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FloatingPointError, match=r"non-finite loss .*\(run b\)"):
        _ft(model, [healthy[0], huge], train, splits)


def test_evaluate_skips_diverged_and_non_finite_models(digits):
    data, model, train, test, healthy, huge, splits = digits
    kw = dict(train=train, test=test, splits=[splits] * 3, forget_classes=[(0,)] * 3,
              seeds=[0, 0, 0], names=["a", "b", "c"], workers=1)  # fmt: skip
    scores = evaluate(model, [healthy[0], huge, None], skip_nonfinite=True, **kw)
    assert scores[1] is None and scores[2] is None
    # The same wave shape with healthy models: the same program, so model 0's scores are equal.
    assert scores[0] == evaluate(model, [healthy[0], healthy[1], healthy[0]], **kw)[0]
    pending = evaluate(model, [healthy[0], huge, None], skip_nonfinite=True, wait=False, **kw)
    assert pending.unscored[1].startswith("b gives non-finite logits")
    assert "diverged" in pending.unscored[2]
    with pytest.raises(FloatingPointError, match="b gives non-finite logits"):
        evaluate(model, [healthy[0], huge], **{**kw, "splits": [splits] * 2,
                 "forget_classes": [(0,)] * 2, "seeds": [0, 0], "names": ["a", "b"]})  # fmt: skip


def test_reports_say_diverged_and_average_the_rest(tmp_path):
    def entry(ua, diverged=False):
        if diverged:
            return {"diverged": "non-finite loss", "seconds": 2.0}
        return {"UA": ua, "RA": 90.0, "TA": 80.0, "mia_efficacy": 50.0, "seconds": 2.0}

    runs = []
    for seed, ga_diverged in ((0, True), (1, False), (2, False)):
        m = {"original": entry(0.0), "retrain": entry(100.0), "ga": entry(40.0 + seed,
             ga_diverged), "rl": entry(1.0, True)}  # fmt: skip
        metrics.add_gaps(m)
        runs.append({"forget_class": 0, "seed": seed, "methods": m})
    assert runs[0]["methods"]["ga"]["avg_gap"] is None
    build_reports({"dataset": "digits", "scenario": "class", "runs": runs}, tmp_path)
    md = (tmp_path / "results.md").read_text()
    ga = next(line for line in md.splitlines() if line.startswith("| GA |"))
    # UA over the two runs that did not diverge: 41 and 42.
    assert ga.split(" | ")[1] == "41.50 ± 0.50 (2 runs; 1 diverged)", ga
    rl = next(line for line in md.splitlines() if line.startswith("| RL |"))
    assert rl.split(" | ")[1] == "diverged", rl
    csv = (tmp_path / "results.csv").read_text().splitlines()
    assert csv[0].endswith(",diverged")
    assert sum(line.endswith(",non-finite loss") for line in csv) == 4


def _main_job(workdir, *extra):
    return subprocess.run(
        [sys.executable, "-m", "experiments.unlearn", "--no-progress", "--workdir", str(workdir),
         "--original-epochs", "1", "--no-relearn", "--impair-lr", "1e30", "--camu-epochs", "1",
         "--scenario", "random", "--forget-fraction", "0.02", *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=1200,
    )  # fmt: skip


def test_main_job_records_a_diverged_method_and_finishes(tmp_path):
    # 29 forgetting items: one CaMU step, whose loss is finite; its update with impair lr 1e30
    # leaves finite weights near 1e30, whose logits overflow.
    workdir = tmp_path / "run"
    proc = _main_job(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: camu diverged on 1 of 1 runs (random-all-seed0)" in proc.stdout
    results = json.loads((workdir / "results.json").read_text())
    camu = results["runs"][0]["methods"]["camu"]
    assert camu["diverged"].startswith("the camu model of random-all-seed0 gives non-finite")
    assert "UA" not in camu and camu["avg_gap"] is None
    assert results["runs"][0]["methods"]["retrain"]["UA"] is not None
    assert not (workdir / "checkpoints" / "camu").exists()
    assert "| CaMU | diverged |" in (workdir / "results.md").read_text()


def test_main_job_stops_on_divergence_when_asked(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "results.json").write_text("earlier results")
    proc = _main_job(workdir, "--on-divergence", "stop")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the camu model of random-all-seed0 gives non-finite logits")
    assert not (workdir / "checkpoints" / "camu").exists()
    assert (workdir / "results.json").read_text() == "earlier results"
