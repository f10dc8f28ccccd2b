"""D_f / D_r / D_s selection (`camu_jax.data.splits`): sizes, invariants, seeds, errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from camu_jax.data.splits import (
    ForgetSpec,
    Splits,
    cifar100_class_spec,
    make_splits,
    select_forget,
)

NUM_CLASSES = 10
N = 200


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """200 labels, 20 per class, in shuffled order."""
    return np.random.default_rng(0).permutation(np.arange(N) % NUM_CLASSES)


def _check_invariants(splits: Splits, n: int) -> None:
    for name in ("forget", "remain", "sample"):
        arr = getattr(splits, name)
        assert arr.dtype == np.int64, name
        assert arr.ndim == 1, name
        assert np.all(np.diff(arr) > 0), f"{name} is not sorted and unique"
    assert np.intersect1d(splits.forget, splits.remain).size == 0
    np.testing.assert_array_equal(
        np.sort(np.concatenate([splits.forget, splits.remain])), np.arange(n)
    )
    assert np.all(np.isin(splits.sample, splits.remain))


# ---------------------------------------------------------------------------- sizes and sets


def test_class_removal_is_exactly_that_class(labels):
    splits = make_splits(labels, ForgetSpec(kind="class", classes=(3,)), seed=0, num_classes=10)
    _check_invariants(splits, N)
    np.testing.assert_array_equal(splits.forget, np.flatnonzero(labels == 3))
    assert splits.forget.size == np.sum(labels == 3) == 20
    assert splits.remain.size == N - 20
    assert np.all(labels[splits.remain] != 3)
    assert splits.sample.size == splits.forget.size
    assert splits.sizes() == {"forget": 20, "remain": 180, "sample": 20, "forget_repeat": 1}


def test_class_removal_of_several_classes(labels):
    splits = make_splits(labels, ForgetSpec(kind="class", classes=(1, 7)), seed=0, num_classes=10)
    _check_invariants(splits, N)
    np.testing.assert_array_equal(splits.forget, np.flatnonzero((labels == 1) | (labels == 7)))


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.333, 0.5])
def test_random_removal_size(labels, fraction):
    splits = make_splits(
        labels, ForgetSpec(kind="random", fraction=fraction), seed=3, num_classes=10
    )
    _check_invariants(splits, N)
    assert splits.forget.size == int(round(fraction * N))
    assert splits.sample.size == splits.forget.size


def test_proportions_per_class(labels):
    props = (0.0, 0.1, 0.25, 0.5, 1.0, 0.0, 0.05, 0.0, 0.75, 0.3)
    splits = make_splits(
        labels, ForgetSpec(kind="proportions", proportions=props), seed=1, num_classes=10
    )
    _check_invariants(splits, N)
    forget_labels = labels[splits.forget]
    for c, p in enumerate(props):
        assert np.sum(forget_labels == c) == int(round(p * 20)), c
    # A class removed with proportion 1 leaves nothing of it in D_r.
    assert np.all(labels[splits.remain] != 4)


def test_indices_are_exact_and_sorted(labels):
    spec = ForgetSpec(kind="indices", indices=(150, 5, 3, 99))
    splits = make_splits(labels, spec, seed=0, num_classes=10)
    _check_invariants(splits, N)
    np.testing.assert_array_equal(splits.forget, np.array([3, 5, 99, 150], np.int64))
    np.testing.assert_array_equal(
        select_forget(labels, spec, seed=123, num_classes=10), [3, 5, 99, 150]
    )


def test_explicit_sample_size(labels):
    spec = ForgetSpec(kind="class", classes=(0,))
    splits = make_splits(labels, spec, seed=0, num_classes=10, sample_size=57)
    _check_invariants(splits, N)
    assert splits.sample.size == 57
    # The whole of D_r is allowed.
    full = make_splits(labels, spec, seed=0, num_classes=10, sample_size=180)
    np.testing.assert_array_equal(full.sample, full.remain)


def test_cifar100_class_spec_repeats_ten_times():
    labels = np.random.default_rng(1).permutation(np.arange(2000) % 100)  # 20 per class
    spec = cifar100_class_spec(42)
    assert spec.kind == "class" and spec.classes == (42,) and spec.repeat == 10
    splits = make_splits(labels, spec, seed=0, num_classes=100)
    _check_invariants(splits, 2000)
    np.testing.assert_array_equal(splits.forget, np.flatnonzero(labels == 42))
    assert splits.repeat == 10
    assert splits.sample.size == 10 * splits.forget.size == 200
    assert splits.sizes()["forget_repeat"] == 10


def test_repeat_sample_size_too_big_names_the_size(labels):
    # 20 forget items x repeat 10 = 200 > |D_r| = 180.
    spec = ForgetSpec(kind="class", classes=(2,), repeat=10)
    with pytest.raises(ValueError, match=r"sample size 200 .*1\.\.180"):
        make_splits(labels, spec, seed=0, num_classes=10)


# ---------------------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    "spec",
    [
        ForgetSpec(kind="class", classes=(5,)),
        ForgetSpec(kind="random", fraction=0.2),
        ForgetSpec(kind="proportions", proportions=(0.5,) * 10),
    ],
    ids=["class", "random", "proportions"],
)
def test_same_seed_same_splits(labels, spec):
    a = make_splits(labels, spec, seed=7, num_classes=10)
    b = make_splits(labels.copy(), spec, seed=7, num_classes=10)
    for name in ("forget", "remain", "sample"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_different_seed_different_random_sets(labels):
    spec = ForgetSpec(kind="random", fraction=0.2)
    a = make_splits(labels, spec, seed=0, num_classes=10)
    b = make_splits(labels, spec, seed=1, num_classes=10)
    assert a.forget.size == b.forget.size
    assert not np.array_equal(a.forget, b.forget)
    assert not np.array_equal(a.sample, b.sample)
    # Class removal: D_f is fixed, only D_s depends on the seed.
    spec = ForgetSpec(kind="class", classes=(5,))
    a = make_splits(labels, spec, seed=0, num_classes=10)
    b = make_splits(labels, spec, seed=1, num_classes=10)
    np.testing.assert_array_equal(a.forget, b.forget)
    assert not np.array_equal(a.sample, b.sample)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [10, -1, 12])
def test_class_out_of_range(labels, bad):
    with pytest.raises(ValueError, match=rf"forget class {bad} .*0\.\.9"):
        make_splits(labels, ForgetSpec(kind="class", classes=(1, bad)), seed=0, num_classes=10)


def test_class_removal_needs_a_class(labels):
    with pytest.raises(ValueError, match="at least one class"):
        make_splits(labels, ForgetSpec(kind="class", classes=()), seed=0, num_classes=10)


@pytest.mark.parametrize("fraction", [0, 0.0, 1, 1.0, 1.5, -0.2])
def test_fraction_out_of_range(labels, fraction):
    with pytest.raises(ValueError, match=rf"forget fraction {re.escape(str(fraction))} "):
        make_splits(labels, ForgetSpec(kind="random", fraction=fraction), seed=0, num_classes=10)


def test_random_fraction_rounding_to_nothing(labels):
    # round(0.001 * 200) == 0: refused as an empty forget set, not a silent no-op.
    with pytest.raises(ValueError, match="empty"):
        make_splits(labels, ForgetSpec(kind="random", fraction=0.001), seed=0, num_classes=10)


def test_random_fraction_rounding_to_everything(labels):
    with pytest.raises(ValueError, match="whole training set"):
        make_splits(labels, ForgetSpec(kind="random", fraction=0.999), seed=0, num_classes=10)


def test_empty_forget_set_for_absent_class(labels):
    without_3 = labels[labels != 3]
    with pytest.raises(ValueError, match="forget set is empty"):
        make_splits(without_3, ForgetSpec(kind="class", classes=(3,)), seed=0, num_classes=10)


def test_forgetting_every_class_is_refused():
    labels = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="whole training set"):
        make_splits(labels, ForgetSpec(kind="class", classes=(0, 1)), seed=0, num_classes=2)


@pytest.mark.parametrize("bad", [200, -1, 1000])
def test_indices_out_of_range(labels, bad):
    with pytest.raises(ValueError, match=rf"out of range 0\.\.199: \[{bad}\]"):
        make_splits(labels, ForgetSpec(kind="indices", indices=(4, bad)), seed=0, num_classes=10)


def test_duplicated_indices(labels):
    with pytest.raises(ValueError, match=r"duplicated forget indices: \[4, 7\]"):
        make_splits(
            labels, ForgetSpec(kind="indices", indices=(4, 7, 4, 9, 7)), seed=0, num_classes=10
        )


def test_empty_indices(labels):
    with pytest.raises(ValueError, match="empty"):
        make_splits(labels, ForgetSpec(kind="indices", indices=()), seed=0, num_classes=10)


def test_unknown_kind(labels):
    with pytest.raises(ValueError, match=r"unknown forget kind 'bogus'"):
        make_splits(labels, ForgetSpec(kind="bogus"), seed=0, num_classes=10)  # type: ignore[arg-type]


def test_proportions_wrong_length(labels):
    with pytest.raises(ValueError, match="proportions must have 10 entries, got 3"):
        make_splits(
            labels, ForgetSpec(kind="proportions", proportions=(0.1,) * 3), seed=0, num_classes=10
        )


def test_proportions_out_of_range(labels):
    props = (0.1,) * 9 + (1.5,)
    with pytest.raises(ValueError, match=r"proportions must lie in \[0, 1\].*1\.5"):
        make_splits(
            labels, ForgetSpec(kind="proportions", proportions=props), seed=0, num_classes=10
        )


@pytest.mark.parametrize("size", [181, 1000, 0, -3])
def test_sample_size_out_of_range(labels, size):
    spec = ForgetSpec(kind="class", classes=(0,))
    with pytest.raises(ValueError, match=rf"sample size {size} must be in 1\.\.180"):
        make_splits(labels, spec, seed=0, num_classes=10, sample_size=size)


def test_repeat_must_be_positive(labels):
    with pytest.raises(ValueError, match="repeat must be >= 1, got 0"):
        make_splits(
            labels, ForgetSpec(kind="class", classes=(0,), repeat=0), seed=0, num_classes=10
        )


# ---------------------------------------------------------------------------- serialization


def test_to_arrays_from_arrays_round_trip(labels, tmp_path):
    splits = make_splits(
        labels, ForgetSpec(kind="random", fraction=0.3, repeat=2), seed=5, num_classes=10
    )
    again = Splits.from_arrays(splits.to_arrays())
    path = tmp_path / "splits.npz"
    np.savez(path, **splits.to_arrays())
    with np.load(path) as f:
        loaded = Splits.from_arrays(dict(f))
    for restored in (again, loaded):
        assert restored.repeat == 2
        assert isinstance(restored.repeat, int)
        for name in ("forget", "remain", "sample"):
            arr = getattr(restored, name)
            assert arr.dtype == np.int64
            np.testing.assert_array_equal(arr, getattr(splits, name))
        assert restored.sizes() == splits.sizes()


def test_from_arrays_casts_to_int64():
    restored = Splits.from_arrays(
        {
            "forget": np.array([1, 2], np.int32),
            "remain": [0, 3],
            "sample": np.array([3], np.uint16),
            "repeat": np.array(1),
        }
    )
    assert all(a.dtype == np.int64 for a in (restored.forget, restored.remain, restored.sample))
