"""`compare` open at both ends (issue 19, item 2): it takes trained originals, returns every
model beside the metrics, keeps one row per config, runs plain functions
(`methods.from_function`), and docs/custom_methods.md's examples run as written."""

import re
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import camu_jax
from camu_jax import DeviceData, ForgetSpec, TrainConfig, compare, evaluate, make_splits, methods
from camu_jax.results import METRIC_KEYS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "custom_methods.md"


class MLP(nn.Module):
    head_modules = ("head",)

    @nn.compact
    def __call__(self, x, *, train, mask=None):
        z = nn.Dense(32)(nn.relu(nn.Dense(64)(x.reshape(len(x), -1))))
        return nn.Dense(10, name="head")(nn.relu(z)), z


MODEL = MLP()
CALLS = []


@jax.jit
def _sgd(params, x, y):
    def loss(p):
        logits, _ = MODEL.apply({"params": p}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.tree.map(lambda w, g: w - 0.05 * g, params, jax.grad(loss)(params))


def finetune_by_hand(variables, retain, forget, validation):
    """A few SGD steps on D_r, by hand."""
    CALLS.append(
        {
            "retain": (retain.x.shape, retain.y.shape),
            "forget": len(forget),
            "validation": len(validation),
            "dtype": retain.x.dtype,
        }
    )
    params = variables["params"]
    for x, y in retain.batches(128):
        params = _sgd(params, x, y)
    return {"params": params, "batch_stats": variables["batch_stats"]}


def blow_up(variables, retain, forget, validation):
    return jax.tree.map(lambda w: w * np.nan, variables)


@pytest.fixture(scope="module")
def problem():
    d = load_digits()
    x, y = (d.images[..., None] / 16).astype(np.float32), d.target
    train, test = DeviceData.put(x[:1400], y[:1400]), DeviceData.put(x[1400:], y[1400:])
    splits = [make_splits(y[:1400], ForgetSpec(classes=(3,)), seed=0, num_classes=10)]
    return {"train": train, "test": test, "splits": splits, "seeds": [0]}


def _compare(problem, **kw):
    return compare(MODEL, **problem, train_config=TrainConfig(epochs=1), eval_workers=1, **kw)


@pytest.fixture(scope="module")
def first(problem):
    CALLS.clear()
    return _compare(
        problem,
        methods=[
            methods.get("ga", learning_rate=1e-3),
            methods.from_function(finetune_by_hand, name="ft_by_hand"),
            methods.get("ga", learning_rate=1e-2),
            methods.from_function(blow_up, name="blow_up"),
        ],
    )


def _scores(entry: dict) -> dict:
    """The scores of a results entry (what `evaluate` gives; no times or gaps)."""
    return {k: entry[k] for k in METRIC_KEYS}


def _evaluate(problem, variables) -> dict:
    return evaluate(
        MODEL,
        [variables],
        train=problem["train"],
        test=problem["test"],
        splits=problem["splits"],
        forget_classes=[(3,)],
        seeds=problem["seeds"],
        workers=1,
    )[0]


def test_two_configs_of_one_method_are_two_rows(first):
    rows = list(first[0]["methods"])
    assert rows == [
        "original",
        "retrain",
        "ga[learning_rate=0.001]",
        "ga[learning_rate=0.01]",
        "ft_by_hand",
        "blow_up",
    ]
    configs = first.record["method_configs"]
    assert configs["ga[learning_rate=0.001]"]["learning_rate"] == 1e-3
    assert configs["ga[learning_rate=0.01]"]["learning_rate"] == 1e-2
    assert configs["ft_by_hand"]["function"].endswith("finetune_by_hand")
    a, b = (first[0]["methods"][f"ga[learning_rate={lr}]"] for lr in (0.001, 0.01))
    assert a["forget_train_acc"] != b["forget_train_acc"]
    text = camu_jax.table(first)
    assert "ga[learning_rate=0.001]" in text and "ga[learning_rate=0.01]" in text


def test_the_same_config_twice_is_refused(problem):
    with pytest.raises(ValueError, match="repeats an earlier one's settings"):
        _compare(problem, methods=["ga", methods.get("ga")])


def test_returned_models_evaluate_to_the_reported_metrics(problem, first):
    assert set(first.models) == set(first[0]["methods"])
    for row, variables in first.models.items():
        if row == "blow_up":
            assert variables == [None]
            continue
        evaluated = _evaluate(problem, variables[0])
        assert set(evaluated) == set(METRIC_KEYS)
        assert evaluated == _scores(first[0]["methods"][row]), row


def test_a_function_method_runs_member_by_member(first):
    sizes = first[0]["split_sizes"]
    n = sizes["remain"]
    assert CALLS == [
        {
            "retain": ((n, 8, 8, 1), (n,)),
            "forget": sizes["forget"],
            "validation": sizes["test"],
            "dtype": np.float32,
        }
    ]
    entry = first[0]["methods"]["ft_by_hand"]
    assert entry["seconds"] > 0 and entry["rte"] > 0
    moved = jax.tree.map(
        lambda a, b: float(np.abs(a - b).max()),
        first.models["ft_by_hand"][0]["params"],
        first.models["original"][0]["params"],
    )
    assert max(jax.tree.leaves(moved)) > 0
    assert "NaN" in first[0]["methods"]["blow_up"]["diverged"]
    assert first[0]["methods"]["blow_up"]["seconds"] > 0


def test_a_given_original_is_used_and_not_trained(problem, first):
    # The GA-unlearned model of the first comparison, given as the original: the original row
    # is its score, and no original phase runs.
    given = first.models["ga[learning_rate=0.01]"][0]
    out = _compare(problem, methods=["ft"], originals={0: given}, record=True)
    assert [p["phase"] for p in out["phases"]][:1] == ["retrain"]
    original = out["runs"][0]["methods"]["original"]
    assert original["seconds"] is None
    assert _scores(original) == _scores(first[0]["methods"]["ga[learning_rate=0.01]"])
    assert _scores(original) == _evaluate(problem, given)
    for a, b in zip(
        jax.tree.leaves(out.models["original"][0]), jax.tree.leaves(given), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert "ft" in out.models and out.models["ft"][0] is not None


def test_originals_that_do_not_fit_the_model_are_refused(problem, first):
    good = first.models["original"][0]
    bad = jax.tree.map(np.array, good)
    kernel = bad["params"]["Dense_0"]["kernel"]
    bad["params"]["Dense_0"]["kernel"] = kernel[:, :10]
    with pytest.raises(ValueError, match=r"seed 0.*Dense_0.*kernel.*shape \(64, 10\)"):
        _compare(problem, methods=[], originals={0: bad})
    with pytest.raises(ValueError, match=r"no model for seeds \[0\]"):
        _compare(problem, methods=[], originals={1: good})
    wrong_dtype = jax.tree.map(lambda a: a.astype(np.float64), good)
    with pytest.raises(ValueError, match="float64.*float32"):
        _compare(problem, methods=[], originals=[wrong_dtype])
    missing = {"params": {k: v for k, v in good["params"].items() if k != "head"}}
    with pytest.raises(ValueError, match="missing .*head"):
        _compare(problem, methods=[], originals={0: missing})


def test_from_function_refuses_taken_names():
    with pytest.raises(ValueError, match="taken"):
        methods.from_function(finetune_by_hand, name="ft")
    with pytest.raises(ValueError, match="letters"):
        methods.from_function(finetune_by_hand, name="ft[x]")


def test_custom_methods_doc_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 3
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/custom_methods.md python block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    for row in ("ascend_repair", "ft_by_hand", "ga[learning_rate=0.001]", "ga[learning_rate=0.01]"):
        assert row in out, row
    assert namespace["result"][0]["methods"]["ascend_repair"]["seconds"] > 0
