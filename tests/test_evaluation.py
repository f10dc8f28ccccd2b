"""The library's evaluation gives the values the experiment layer gave before it moved there.

The fixtures hold what `experiments/run.py`'s `Experiment.evaluate` returned at commit 6705bd0
(the last one before the move) for two fixed models, the untrained CNNs of seeds 0 and 1 on
digits forgetting class 0 and class 3, and those models' logits (the fixture's `_how` entry says
how they were made).

* `score`, on those logits, must give those values bit for bit: the same metric code.
* The library's forward pass must give those logits up to float32 rounding: a population's
  forward pass runs the models' convolutions batched over members, which may sum in another
  order. Bound: a logit is a sum over <= 1568 products (the CNN's widest layer), each rounded
  (relative 2**-24), through four layers: |d| <= 4 * 1568 * 2**-24 * max|logit| ~ 4e-4
  max|logit|. (The reference MIA, an XGBoost on sorted softmax outputs, can move with such
  last-bit differences on these untrained models, whose outputs are nearly uniform: that is why
  values are compared from the same logits.)
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from camu_jax import sharding
from camu_jax.data import DeviceData, ForgetSpec, input_spec_for, load_dataset, make_splits
from camu_jax.evaluation import evaluate, score
from camu_jax.models import create_model, init_variables

FIXTURES = Path(__file__).parent / "fixtures"
CASES = [(0, 0), (1, 3)]


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits", progress=False)
    splits = [
        make_splits(d.train_labels, ForgetSpec(kind="class", classes=(c,)), seed=s, num_classes=10)
        for s, c in CASES
    ]
    return d, splits


def test_score_gives_the_experiment_layers_values(digits):
    d, splits = digits
    expected = json.loads((FIXTURES / "evaluate_before_move.json").read_text())
    logits = np.load(FIXTURES / "evaluate_before_move_logits.npz")
    for (seed, cls), sp in zip(CASES, splits, strict=True):
        got = score(
            train_logits=logits[f"train_{seed}_{cls}"],
            train_labels=d.train_labels,
            test_logits=logits[f"test_{seed}_{cls}"],
            test_labels=d.test_labels,
            splits=sp,
            forget_classes=(cls,),
            seed=seed,
        )
        assert got == expected[f"{seed}-{cls}"], (seed, cls)


@pytest.mark.parametrize("population", [1, 2])
def test_evaluate_forward_pass_gives_the_same_logits(digits, population, monkeypatch):
    d, splits = digits
    logits = np.load(FIXTURES / "evaluate_before_move_logits.npz")
    mesh = sharding.make_mesh()
    spec = input_spec_for("digits", "cnn")
    train = DeviceData.put(d.train_images, d.train_labels, spec=spec, mesh=mesh)
    test = DeviceData.put(d.test_images, d.test_labels, spec=spec, mesh=mesh)
    model = create_model("cnn", num_classes=10)
    seen = []

    def record(**job):  # the logits evaluate hands to `score`, in order
        seen.append(job)
        return score(**job)

    monkeypatch.setattr("camu_jax.evaluation.score", record)
    evaluate(
        model,
        [init_variables(model, jax.random.key(seed), train.input_shape) for seed, _ in CASES],
        train=train,
        test=test,
        splits=splits,
        forget_classes=[(c,) for _, c in CASES],
        seeds=[s for s, _ in CASES],
        workers=1,
        population_size=population,  # 1: one model per pass; 2: both in one pass
    )
    for job, (seed, cls) in zip(seen, CASES, strict=True):
        for split in ("train", "test"):
            want = logits[f"{split}_{seed}_{cls}"]
            bound = 4 * 1568 * 2.0**-24 * np.abs(want).max()
            np.testing.assert_allclose(job[f"{split}_logits"], want, rtol=0, atol=bound)
