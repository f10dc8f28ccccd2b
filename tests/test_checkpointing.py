"""Orbax checkpoints: save/restore, resume == uninterrupted, mismatches, interrupted saves."""

import jax
import numpy as np
import pytest

from camu_jax import checkpointing, sharding
from camu_jax.models import create_model, init_variables
from camu_jax.steps import adam_l2, init_train_state
from camu_jax.training import TrainConfig, train_model

N = 96


@pytest.fixture(scope="module")
def problem(random_images_96):
    return random_images_96


def _train(problem, epochs, ckpt=None, meta=None, model="cnn"):
    m = create_model(model, num_classes=10)
    v = init_variables(m, jax.random.key(0), (8, 8, 1))
    return train_model(
        m,
        v,
        data=problem,
        items=np.arange(N),
        config=TrainConfig(epochs=epochs),
        seed=0,
        checkpoint_dir=ckpt,
        meta=meta or {"model": model},
        progress=False,
    )


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_equals_uninterrupted(problem, tmp_path):
    full, _ = _train(problem, 3)
    # "Interrupted" after epoch 2: a run asked for 2 epochs leaves a checkpoint at step 2 ...
    _train(problem, 2, tmp_path / "ck")
    assert checkpointing.latest_step(tmp_path / "ck") == 2
    # ... and a run asked for 3 resumes from it and trains only the last epoch.
    resumed, info = _train(problem, 3, tmp_path / "ck")
    assert info["resumed_from"] == 2 and info["epochs_run"] == 1
    _assert_equal(full, resumed)


def test_finished_run_is_restored_not_retrained(problem, tmp_path):
    first, _ = _train(problem, 1, tmp_path / "ck")
    again, info = _train(problem, 1, tmp_path / "ck")
    assert info["epochs_run"] == 0 and info["seconds"] > 0
    _assert_equal(first, again)


def test_mismatched_model_is_rejected(problem, tmp_path):
    _train(problem, 1, tmp_path / "ck", meta={"model": "cnn"})
    with pytest.raises(checkpointing.CheckpointMismatchError, match="model.*cnn.*resnet18"):
        _train(problem, 1, tmp_path / "ck", meta={"model": "resnet18"})


def test_mismatched_structure_is_rejected(problem, tmp_path):
    mesh = problem.mesh
    cnn = create_model("cnn", num_classes=10)
    state = init_train_state(init_variables(cnn, jax.random.key(0), (8, 8, 1)), adam_l2(1e-3))
    checkpointing.save(tmp_path / "ck", 1, state, {"model": "x"})
    other = create_model("cnn", num_classes=7)  # same name, other head: shapes differ
    wrong = init_train_state(init_variables(other, jax.random.key(0), (8, 8, 1)), adam_l2(1e-3))
    with pytest.raises(checkpointing.CheckpointMismatchError):
        checkpointing.restore(
            tmp_path / "ck",
            abstract_state=checkpointing.abstract_like(sharding.replicate(wrong, mesh)),
            expected_meta={"model": "x"},
        )


def test_interrupted_save_is_not_restorable(problem, tmp_path):
    cnn = create_model("cnn", num_classes=10)
    state = init_train_state(init_variables(cnn, jax.random.key(0), (8, 8, 1)), adam_l2(1e-3))
    checkpointing.save(tmp_path / "ck", 1, state, {"model": "cnn"})
    # Orbax writes a step under a temporary name and renames it when complete; a crash leaves
    # only the temporary directory, which must not count as a checkpoint.
    (tmp_path / "ck" / "2.orbax-checkpoint-tmp-123").mkdir()
    (tmp_path / "ck" / "2.orbax-checkpoint-tmp-123" / "partial").write_bytes(b"\0" * 10)
    assert checkpointing.latest_step(tmp_path / "ck") == 1
    step, restored, meta = checkpointing.restore(
        tmp_path / "ck",
        abstract_state=checkpointing.abstract_like(state),
        expected_meta={"model": "cnn"},
    )
    assert step == 1 and meta["model"] == "cnn"
    _assert_equal(state, restored)


def test_corrupt_checkpoint_gives_clear_error(problem, tmp_path):
    cnn = create_model("cnn", num_classes=10)
    state = init_train_state(init_variables(cnn, jax.random.key(0), (8, 8, 1)), adam_l2(1e-3))
    checkpointing.save(tmp_path / "ck", 1, state, {"model": "cnn"})
    for f in (tmp_path / "ck" / "1" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"garbage")
    with pytest.raises(checkpointing.CheckpointMismatchError, match="ck"):
        checkpointing.restore(
            tmp_path / "ck",
            abstract_state=checkpointing.abstract_like(state),
            expected_meta={"model": "cnn"},
        )
