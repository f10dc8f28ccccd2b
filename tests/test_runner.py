"""The one wave runner (`camu_jax.runner`): every phase checkpoints, resumes after a kill and
records a diverged member the same way.

A kill is simulated by a `checkpointing.save` that raises after its n-th save (the process
dies right after a checkpoint was made durable, which is what a kill -9 leaves behind); the
run is then started again with the same directories. Plans are fixed functions of (member,
epoch) and a restored state is the saved one, so the resumed result must equal the
uninterrupted one bit for bit (same program, same layout: `population_size=2`).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from camu_jax import checkpointing, methods, runner, sharding
from camu_jax.data import load_dataset
from camu_jax.data.pipeline import DeviceData, InputSpec
from camu_jax.data.splits import ForgetSpec, make_splits
from camu_jax.methods.base import run_population
from camu_jax.models import create_model, init_variables
from camu_jax.training import TrainConfig, train_population

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def setup():
    d = load_dataset("digits", progress=False)
    data = DeviceData.put(
        d.train_images, d.train_labels, spec=InputSpec(), mesh=sharding.make_mesh()
    )
    model = create_model("cnn", num_classes=10)
    starts = [init_variables(model, jax.random.key(s), (8, 8, 1)) for s in SEEDS]
    splits = [
        make_splits(d.train_labels, ForgetSpec(kind="class", classes=(c,)), seed=s, num_classes=10)
        for s, c in zip(SEEDS, (0, 3), strict=True)
    ]
    return data, model, starts, splits


class _Killed(Exception):
    pass


def _kill_after(monkeypatch, saves: int) -> None:
    real = checkpointing.save
    count = [0]

    def save(*args, **kwargs):
        real(*args, **kwargs)
        count[0] += 1
        if count[0] == saves:
            raise _Killed

    monkeypatch.setattr(runner.checkpointing, "save", save)


def _assert_same(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _unsir(setup, **kw):
    data, model, starts, splits = setup
    method = methods.get("unsir", impair_epochs=2, repair_epochs=2)
    return run_population(
        method,
        model,
        starts,
        data=data,
        splits=splits,
        seeds=SEEDS,
        num_classes=10,
        population_size=2,
        progress=False,
        **kw,
    )


def test_a_method_killed_inside_its_second_stage_resumes_bit_identically(
    setup, tmp_path, monkeypatch
):
    reference = _unsir(setup)
    dirs = [tmp_path / f"m{i}" for i in range(2)]
    kw = dict(checkpoint_dirs=dirs, metas=[{"run": i} for i in range(2)], checkpoint_every=0.0)
    # Saves go member by member at each epoch end: five saves leave member 0 after 3 epochs
    # (inside the repair stage) and member 1 after 2 (the impair stage's end).
    _kill_after(monkeypatch, 5)
    with pytest.raises(_Killed):
        _unsir(setup, **kw)
    monkeypatch.undo()
    assert [checkpointing.latest_step(d) for d in dirs] == [3, 2]
    resumed = _unsir(setup, **kw)
    assert [info["resumed_from"] for _, info in resumed] == [3, 2]
    for (v, info), (ref, ref_info) in zip(resumed, reference, strict=True):
        _assert_same(v, ref)
        assert info["steps"] == ref_info["steps"]
    # Finished: restored without running.
    again = _unsir(setup, **kw)
    assert [info["epochs_run"] for _, info in again] == [0, 0]
    for (v, _), (ref, _) in zip(again, reference, strict=True):
        _assert_same(v, ref)


def _train(setup, **kw):
    data, model, starts, splits = setup
    return train_population(
        model,
        starts,
        data=data,
        items=[sp.remain for sp in splits],
        seeds=SEEDS,
        config=TrainConfig(epochs=3),
        population_size=2,
        progress=False,
        **kw,
    )


def test_training_killed_between_epochs_resumes_bit_identically(setup, tmp_path, monkeypatch):
    reference = _train(setup)
    dirs = [tmp_path / f"t{i}" for i in range(2)]
    kw = dict(checkpoint_dirs=dirs, metas=[{"run": i} for i in range(2)], checkpoint_every=0.0)
    _kill_after(monkeypatch, 3)
    with pytest.raises(_Killed):
        _train(setup, **kw)
    monkeypatch.undo()
    resumed = _train(setup, **kw)
    assert [info["resumed_from"] for _, info in resumed] == [2, 1]
    for (v, _), (ref, _) in zip(resumed, reference, strict=True):
        _assert_same(v, ref)


def test_a_diverged_training_member_is_recorded_and_the_other_goes_on(setup):
    data, model, starts, splits = setup
    bad = jax.tree.map(lambda x: np.full_like(np.asarray(x), np.nan), starts[0])
    kw = dict(
        data=data,
        config=TrainConfig(epochs=1),
        population_size=2,
        progress=False,
        on_divergence="record",
    )
    items = [sp.remain for sp in splits]
    out = train_population(model, [bad, starts[1]], items=items, seeds=SEEDS, **kw)
    assert out[0][0] is None and "non-finite" in out[0][1]["diverged"]
    assert "diverged" not in out[1][1]
    # Members never mix: the finite member is what it is beside a finite partner.
    alone = train_population(model, [starts[0], starts[1]], items=items, seeds=SEEDS, **kw)
    _assert_same(out[1][0], alone[1][0])


def test_a_stage_position_names_the_stage_a_saved_epoch_ends():
    stage = runner.Stage("a", "k", None, None, 2, 1)
    phase = runner.Phase("p", (stage, runner.Stage("b", "k2", None, None, 3, 1)), None, lambda s: s)
    assert [phase.position(d) for d in range(6)] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 1),
        (1, 2),
        (1, 3),
    ]
    with pytest.raises(ValueError, match="6 epochs done"):
        phase.position(6)
