"""Populations on the loop engine (`camu_jax.engine`): a member computes its sequential run.

The float64 comparisons run in their own process (8 fake CPU devices): population, waves of
two, 8-device sharding and scan chunks (how accelerators run a chunk) against three sequential
runs (one call per step, as on CPU). Tolerance, derived: the programs
differ only in summation order (a grouped convolution over members instead of one per run, a
reduction split over devices). One float64 sum of n terms errs by at most n * eps64 * sum|terms|
(eps64 = 2**-52); the longest reductions here have n <= 2048 terms (a batch of 32 times the
CNN's 8x8 feature maps), so a gradient element errs by <= 2048 * eps64 * G ~ 4.5e-13 G, G the
largest gradient magnitude (<= 10 for these losses). Adam divides by sqrt(v) + 1e-8, so an
update errs by at most lr * 4.5e-12 / 1e-8 = lr * 4.5e-4 (lr <= 1e-3) per step, and K steps by
K times that: 4.5e-7 * K. The runs move every parameter set by ~1e-2, so the bound still
tells a member that saw another member's data from one that did not.
"""

from pathlib import Path

import jax
import numpy as np
import pytest

from camu_jax import engine, sharding
from camu_jax.data.pipeline import DeviceData, InputSpec
from camu_jax.data.splits import ForgetSpec, make_splits
from camu_jax.evaluation import evaluate
from camu_jax.models import create_model, init_variables
from camu_jax.steps import adam_l2, init_train_state
from camu_jax.training import TrainConfig, train_engine, train_population

ROOT = Path(__file__).resolve().parents[1]
ADAM_STEP_ERROR = 4.5e-7  # per step, float64 (module docstring)


@pytest.fixture(scope="module")
def report(run_script):
    return run_script("population.py")


@pytest.mark.parametrize("phase", ["camu", "train"])
@pytest.mark.parametrize("mode", ["population", "two_waves", "eight_devices", "scan"])
def test_member_equals_sequential_float64(report, phase, mode):
    steps = report[f"{phase}_steps"]
    for i, d in enumerate(report[phase][mode]):
        bound = ADAM_STEP_ERROR * (steps[i] * (2 if phase == "camu" else 1))
        assert d["abs"] <= bound, (mode, i, d, bound)
    moved = [m["abs"] for m in report["camu_moved"]]
    assert min(moved) > 1000 * ADAM_STEP_ERROR * max(report["camu_steps"]) * 2


def test_members_differ_in_forget_set_size(report):
    # Different |D_f|, so shorter members really are padded (and left alone) at the end.
    assert len(set(report["forget_sizes"])) > 1


# ------------------------------------------------------------------ in-process (float32)

N = 96


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, 8, 8, 1)).astype(np.uint8)
    labels = rng.integers(0, 4, N).astype(np.int32)
    return DeviceData.put(images, labels, spec=InputSpec(), mesh=sharding.make_mesh())


def _states(model, seeds, tx):
    return [
        init_train_state(init_variables(model, jax.random.key(s), (8, 8, 1)), tx) for s in seeds
    ]


def test_padding_steps_leave_a_member_bit_identical(data):
    model = create_model("cnn", num_classes=4)
    config = TrainConfig()
    run = train_engine(model, config, data.spec, data.mesh)
    tx = adam_l2(config.learning_rate, config.weight_decay)
    states = _states(model, (0, 1), tx)
    stacked = sharding.shard_members(engine.stack(states), data.mesh)
    member = sharding.shard_members(
        {
            "items": np.tile(np.arange(N, dtype=np.int32), (2, 1)),
            "key": np.stack([np.asarray(jax.random.key_data(jax.random.key(s))) for s in (0, 1)]),
        },
        data.mesh,
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(0, N, (2, 5, 32)).astype(np.int32)
    mask = np.ones((2, 5, 32), np.float32)
    mask[1] = 0.0  # member 1: five padding steps
    before = engine.unstack(stacked, 2)
    out, metrics = run(stacked, (data.images, data.labels), member, {"ids": ids, "mask": mask})
    after = engine.unstack(out, 2)
    for x, y in zip(jax.tree.leaves(before[1]), jax.tree.leaves(after[1]), strict=True):
        np.testing.assert_array_equal(x, y)
    changed = [
        not np.array_equal(x, y)
        for x, y in zip(
            jax.tree.leaves(before[0].params), jax.tree.leaves(after[0].params), strict=True
        )
    ]
    assert all(changed)
    active = np.asarray(sharding.fetch(metrics["active"]))
    assert active[:, 0].all() and not active[:, 1].any()


def test_one_compile_serves_every_wave_and_member(data):
    model = create_model("cnn", num_classes=4)
    config = TrainConfig(epochs=1, batch_size=16)
    seeds = (0, 1, 2)
    variables = [init_variables(model, jax.random.key(s), (8, 8, 1)) for s in seeds]
    items = [np.arange(N), np.arange(N // 2), np.arange(N // 3)]
    kw = dict(items=items, seeds=seeds, config=config, progress=False)
    train_population(model, variables, data=data, population_size=2, **kw)
    run = train_engine(model, config, data.spec, data.mesh)
    compiled = run.compiled_count()
    # Other members, other wave split, other item counts: the same programs.
    train_population(model, variables[::-1], data=data, population_size=2, **kw)
    assert run.compiled_count() == compiled


def test_evaluate_population_equals_one_at_a_time():
    from camu_jax.data import load_dataset

    d = load_dataset("digits", progress=False)
    mesh = sharding.make_mesh()
    train = DeviceData.put(d.train_images, d.train_labels, spec=InputSpec(), mesh=mesh)
    test = DeviceData.put(d.test_images, d.test_labels, spec=InputSpec(), mesh=mesh)
    model = create_model("cnn", num_classes=10)
    config = TrainConfig(epochs=2)
    seeds = (0, 1, 2)
    splits = [
        make_splits(d.train_labels, ForgetSpec(kind="class", classes=(c,)), seed=s, num_classes=10)
        for s, c in zip(seeds, (0, 3, 7), strict=True)
    ]
    trained = train_population(
        model,
        [init_variables(model, jax.random.key(s), (8, 8, 1)) for s in seeds],
        data=train,
        items=[sp.remain for sp in splits],
        seeds=seeds,
        config=config,
        progress=False,
    )
    models = [v for v, _ in trained]
    kw = dict(train=train, test=test, splits=splits, forget_classes=[(0,), (3,), (7,)], seeds=seeds)
    together = evaluate(model, models, population_size=3, workers=2, **kw)
    alone = evaluate(model, models, population_size=1, workers=1, **kw)
    assert together == alone
    assert all(r["forget_train_acc"] < 10 for r in alone)  # retrained without the class
