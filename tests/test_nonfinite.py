"""Non-finite states stop a run, naming the phase, before anything of it is saved."""

from pathlib import Path

import jax
import numpy as np
import pytest

from camu_jax import checkpointing, sharding
from camu_jax.data import ForgetSpec, input_spec_for, load_dataset, make_splits
from camu_jax.data.pipeline import DeviceData
from camu_jax.methods.camu import CamuConfig, unlearn
from camu_jax.models import create_model, init_variables
from camu_jax.prediction import predict_logits
from camu_jax.training import TrainConfig, train_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits", progress=False)
    mesh = sharding.make_mesh()
    model = create_model("cnn", num_classes=data.num_classes)
    spec = input_spec_for("digits", "cnn")
    images = DeviceData.put(data.train_images, data.train_labels, spec=spec, mesh=mesh)
    variables = init_variables(model, jax.random.key(0), spec.input_shape(data.image_shape))
    return data, mesh, model, spec, images, variables


def test_parameters_made_non_finite_by_the_last_step_are_not_saved(digits, tmp_path):
    # One step with a learning rate that overflows float32 (1e39 is a finite Python float, so
    # it passes TrainConfig.validate): the step's loss (computed before the update) is finite,
    # the parameters it leaves are not.
    data, mesh, model, spec, images, variables = digits
    with pytest.raises(
        FloatingPointError, match=r"non-finite parameters at original seed 0 epoch 1"
    ):
        train_model(
            model,
            variables,
            data=images,
            items=np.arange(32),
            config=TrainConfig(epochs=1, learning_rate=1e39),
            seed=0,
            checkpoint_dir=tmp_path / "ckpt",
            progress=False,
            desc="original seed 0",
        )
    assert checkpointing.latest_step(tmp_path / "ckpt") is None


def test_unlearn_refuses_non_finite_parameters_after_its_last_step(digits):
    data, mesh, model, spec, images, variables = digits
    # 29 forgetting items: a single double step, whose losses are computed before its update.
    # 1e39 is a finite Python float (it passes CamuConfig.validate) but overflows float32 to
    # inf inside the step, so the update itself makes the parameters non-finite.
    splits = make_splits(
        data.train_labels, ForgetSpec(kind="random", fraction=0.02), seed=0, num_classes=10
    )
    with pytest.raises(FloatingPointError, match=r"non-finite parameters at camu epoch 1: "):
        unlearn(
            model,
            variables,
            data=images,
            splits=splits,
            num_classes=10,
            config=CamuConfig(epochs=1, impair_lr=1e39),
            seed=0,
            progress=False,
        )


def test_predict_logits_refuses_non_finite_logits(digits):
    data, mesh, model, spec, images, variables = digits
    # Finite weights of 1e30 overflow float32 (max ~3.4e38) two layers in.
    huge = jax.tree.map(lambda x: np.full_like(x, 1e30), variables)
    with pytest.raises(FloatingPointError, match=r"the camu model gives non-finite logits on"):
        predict_logits(model, huge, images, name="the camu model")
    logits = predict_logits(model, variables, images)
    assert np.isfinite(logits).all()


# The main job on huge CaMU weights, both ways (record, stop): tests/test_divergence.py.
