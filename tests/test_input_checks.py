"""Library entry points refuse arguments that would run to wrong numbers (or to a non-finite
loss blaming the learning rate): a ValueError at the call, naming the argument and the values."""

import jax
import numpy as np
import pytest

from camu_jax import methods, sharding
from camu_jax.compare import compare
from camu_jax.data.pipeline import DeviceData, InputSpec
from camu_jax.data.splits import ForgetSpec, make_splits
from camu_jax.evaluation import evaluate
from camu_jax.methods.base import run_population
from camu_jax.models import create_model, init_variables
from camu_jax.relearning import relearn
from camu_jax.training import TrainConfig, train_population

N = 48
SHAPE = (8, 8, 1)


def _arrays(n=N, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *SHAPE)).astype(np.uint8), rng.integers(0, classes, n)


def _put(images, labels):
    return DeviceData.put(images, labels, spec=InputSpec(), mesh=sharding.make_mesh())


@pytest.fixture(scope="module")
def data():
    return _put(*_arrays())


def _splits(labels):
    spec = ForgetSpec(kind="class", classes=(0,))
    return make_splits(np.asarray(labels), spec, seed=0, num_classes=4)


# -- DeviceData.put ----------------------------------------------------------------------------


def test_put_refuses_labels_of_another_length():
    images, labels = _arrays()
    with pytest.raises(ValueError, match=r"images of shape \(48, 8, 8, 1\) and labels of shape "):
        _put(images, labels[:40])
    with pytest.raises(ValueError, match=r"\[N\]; got shape \(48, 1\)"):
        _put(images, labels[:, None])


def test_put_refuses_float_labels():
    images, labels = _arrays()
    with pytest.raises(ValueError, match=r"labels of dtype float64 .*must be integers"):
        _put(images, labels + 0.7)


def test_put_refuses_negative_and_huge_labels():
    images, labels = _arrays()
    labels = labels.copy()
    labels[5] = -1
    with pytest.raises(ValueError, match=r"labels \[-1\] at rows \[5\]"):
        _put(images, labels)
    labels[5] = 2**32
    with pytest.raises(ValueError, match=r"labels \[4294967296\] at rows \[5\]"):
        _put(images, labels)


# -- splits made from other labels -------------------------------------------------------------


def test_splits_of_fewer_labels_are_refused_everywhere(data):
    model = create_model("cnn", num_classes=4)
    splits = [_splits(data.host_labels[: N // 2])]
    variables = [init_variables(model, jax.random.key(0), SHAPE)]
    needle = rf"splits\[0\] holds .* = {N // 2} items, but (data|train) has {N} rows"
    with pytest.raises(ValueError, match=needle):
        run_population(
            methods.get("camu"),
            model,
            variables,
            data=data,
            splits=splits,
            seeds=[0],
            num_classes=4,
            progress=False,
        )
    with pytest.raises(ValueError, match=needle):
        evaluate(model, variables, train=data, test=data, splits=splits, forget_classes=[(0,)],
                 seeds=[0], workers=1)  # fmt: skip
    with pytest.raises(ValueError, match=needle):
        relearn(model, variables, data=data, splits=splits, seeds=[0], progress=False)
    with pytest.raises(ValueError, match=needle):
        compare(model, train=data, test=data, splits=splits, seeds=[0],
                train_config=TrainConfig(epochs=1, batch_size=8))  # fmt: skip


def test_splits_indexing_past_the_data_are_refused(data):
    # Made from more labels than the data has: D_f and D_r hold rows that do not exist.
    images, labels = _arrays(2 * N)
    splits = [_splits(labels)]
    model = create_model("cnn", num_classes=4)
    variables = [init_variables(model, jax.random.key(0), SHAPE)]
    with pytest.raises(ValueError, match=r"splits\[0\]\.forget holds indices outside train's"):
        evaluate(model, variables, train=data, test=data, splits=splits, forget_classes=[(0,)],
                 seeds=[0], workers=1)  # fmt: skip


def test_train_items_outside_the_data_are_refused(data):
    model = create_model("cnn", num_classes=4)
    with pytest.raises(
        ValueError, match=rf"items\[1\] holds indices outside data's rows 0..{N - 1}"
    ):
        train_population(
            model,
            [init_variables(model, jax.random.key(s), SHAPE) for s in (0, 1)],
            data=data,
            items=[np.arange(N), np.arange(N, N + 8)],
            seeds=[0, 1],
            config=TrainConfig(epochs=1, batch_size=8),
            progress=False,
        )


# -- labels outside the class range, too few logits --------------------------------------------


def test_labels_outside_num_classes_are_refused(data):
    model = create_model("cnn", num_classes=4)
    with pytest.raises(ValueError, match=r"data has labels outside 0..2 \(num_classes=3\)"):
        run_population(
            methods.get("camu"),
            model,
            [init_variables(model, jax.random.key(0), SHAPE)],
            data=data,
            splits=[_splits(data.host_labels)],
            seeds=[0],
            num_classes=3,
            progress=False,
        )


def test_a_model_with_too_few_logits_is_refused(data):
    small = create_model("cnn", num_classes=3)
    variables = [init_variables(small, jax.random.key(0), SHAPE)]
    needle = r"has label 3 but the model gives only 3 logits per image"
    with pytest.raises(ValueError, match=needle):
        train_population(small, variables, data=data, items=[np.arange(N)], seeds=[0],
                         config=TrainConfig(epochs=1, batch_size=8), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=needle):
        evaluate(small, variables, train=data, test=data, splits=[_splits(data.host_labels)],
                 forget_classes=[(0,)], seeds=[0], workers=1)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"the model gives 3 logits per image but num_classes is 4"
    ):
        run_population(methods.get("camu"), small, variables, data=data,
                       splits=[_splits(data.host_labels)], seeds=[0], num_classes=4,
                       progress=False)  # fmt: skip


def test_evaluate_refuses_test_images_of_another_size(data):
    model = create_model("cnn", num_classes=4)
    variables = init_variables(model, jax.random.key(0), SHAPE)
    rng = np.random.default_rng(1)
    test = _put(rng.integers(0, 256, (16, 10, 10, 1)).astype(np.uint8), rng.integers(0, 4, 16))
    with pytest.raises(ValueError, match=r"test images of shape \(16, 10, 10, 1\) differ"):
        evaluate(
            model,
            [variables],
            train=data,
            test=test,
            splits=[_splits(data.host_labels)],
            forget_classes=[(0,)],
            seeds=[0],
            workers=1,
        )


def test_held_out_rows_are_accepted_when_the_splits_say_so(data):
    """A validation set held out of D_r (`Splits.held_out`, as experiments.tune holds one) is
    not "splits of other data"; the same rows missing without the record are refused."""
    import dataclasses

    from camu_jax.checks import check_splits

    full = _splits(data.host_labels)
    held = full.remain[:5]
    kept = dataclasses.replace(full, remain=full.remain[5:], sample=np.setdiff1d(full.sample, held))
    with pytest.raises(ValueError, match=r"= 43 items, but data has 48 rows"):
        check_splits([kept], data)
    check_splits([dataclasses.replace(kept, held_out=held)], data)
    with pytest.raises(ValueError, match=r"\+ 5 held out = 53 items"):  # held out, still in D_r
        check_splits([dataclasses.replace(full, held_out=held)], data)
