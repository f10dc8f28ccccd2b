"""Counterfactual pairing and labels (host, numpy) and noise (JAX) (`camu_jax.counterfactual`)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from camu_jax.counterfactual import (
    counterfactual_inputs,
    counterfactual_noise,
    make_counterfactuals,
)

# The noise runs jitted (as the forward passes of `camu_jax.evaluation` call it), with few
# distinct shapes, at XLA's lowest optimisation level (same results, less compile time).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@jit
def _noise_and_inputs(key, item_ids, sample_inputs):
    noise = counterfactual_noise(key, item_ids, sample_inputs.shape[1:])
    x_cf = counterfactual_inputs(key, item_ids=item_ids, sample_inputs=sample_inputs)
    return noise, x_cf


N = 4000  # items in the label tests
B, SHAPE = 64, (4, 4, 3)  # batch and input shape in the noise tests


def _noise(key, ids, x=None):
    x = np.zeros((B, *SHAPE), np.float32) if x is None else x
    noise, x_cf = _noise_and_inputs(key, np.asarray(ids, np.int32), x)
    return np.asarray(noise), np.asarray(x_cf)


def _make(seed, forget_labels, sample_labels, num_classes):
    cf = make_counterfactuals(
        np.random.default_rng(seed),
        forget_labels=forget_labels,
        sample_labels=sample_labels,
        num_classes=num_classes,
    )
    return cf.pair, cf.labels, None


# ---------------------------------------------------------------------------- pairing


def test_pairing_is_a_permutation_when_sizes_are_equal():
    rng = np.random.default_rng(0)
    y_f, y_s = rng.integers(0, 10, N), rng.integers(0, 10, N)
    pair, labels, _ = _make(0, y_f, y_s, 10)
    assert pair.shape == labels.shape == (N,)
    np.testing.assert_array_equal(np.sort(pair), np.arange(N))
    assert np.mean(pair == np.arange(N)) < 0.01  # actually shuffled


def test_pairing_tiles_when_sample_set_is_smaller():
    rng = np.random.default_rng(1)
    n_f, n_s = 20, 7
    pair, labels, _ = _make(1, rng.integers(0, 10, n_f), rng.integers(0, 10, n_s), 10)
    assert pair.shape == labels.shape == (n_f,)
    np.testing.assert_array_equal(np.sort(pair[:7]), np.arange(7))
    np.testing.assert_array_equal(np.sort(pair[7:14]), np.arange(7))
    assert np.unique(pair[14:]).size == 6 and np.all((pair[14:] >= 0) & (pair[14:] < 7))
    counts = np.bincount(pair, minlength=n_s)
    assert counts.min() >= 2 and counts.max() <= 3


def test_pairing_is_one_to_one_when_sample_set_is_larger():
    rng = np.random.default_rng(2)
    pair, _, _ = _make(2, rng.integers(0, 10, 15), rng.integers(0, 10, 40), 10)
    assert pair.shape == (15,)
    assert np.unique(pair).size == 15 and pair.min() >= 0 and pair.max() < 40


# ---------------------------------------------------------------------------- labels


@pytest.mark.parametrize("num_classes", [2, 10])
def test_counterfactual_label_never_equals_forget_label(num_classes):
    rng = np.random.default_rng(num_classes)
    y_f = rng.integers(0, num_classes, N)
    # Random-removal style: D_s drawn from the same distribution as D_f (y_s == y_f for about
    # 1 / num_classes of the pairs), and D_s with the very labels of D_f.
    for y_sample in (rng.integers(0, num_classes, N), y_f[rng.permutation(N)]):
        pair, labels, _ = _make(num_classes, y_f, y_sample, num_classes)
        assert labels.dtype == np.int32
        assert np.all(labels != y_f)
        assert np.all((labels >= 0) & (labels < num_classes))
        collide = y_sample[pair] == y_f
        assert collide.sum() > 0
        # Items whose paired label differs keep it unchanged.
        np.testing.assert_array_equal(labels[~collide], y_sample[pair][~collide])


def test_two_classes_redraw_is_the_other_class():
    y_f = np.random.default_rng(0).integers(0, 2, N)
    _, labels, _ = _make(3, y_f, y_f.copy(), 2)
    np.testing.assert_array_equal(labels, 1 - y_f)


def _chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(np.sum((counts - expected) ** 2 / expected))


@pytest.mark.parametrize("forget_class", [0, 3, 9])
def test_redrawn_labels_uniform_over_other_classes(forget_class):
    y = np.full(N, forget_class)
    _, labels, _ = _make(11 + forget_class, y, y.copy(), 10)  # every label is redrawn
    counts = np.bincount(labels, minlength=10)
    assert counts[forget_class] == 0
    others = np.delete(counts, forget_class)
    # 8 degrees of freedom: P(chi2 > 40) ~ 2e-6 (and the key is fixed, so no flakiness).
    assert _chi_square(others) < 40.0, others


def test_redrawn_labels_uniform_with_mixed_forget_labels():
    rng = np.random.default_rng(5)
    y_f = np.where(rng.random(N) < 0.5, 0, rng.integers(0, 10, N))
    # Every sample label is 0: items forgetting class 0 are redrawn, the others keep 0.
    _, labels, _ = _make(6, y_f, np.zeros(N, np.int64), 10)
    zero = y_f == 0
    np.testing.assert_array_equal(labels[~zero], 0)
    counts = np.bincount(labels[zero], minlength=10)
    assert counts[0] == 0 and counts.sum() > 2000
    assert _chi_square(counts[1:]) < 40.0, counts


# ---------------------------------------------------------------------------- noise


def test_noise_in_unit_interval_and_shape():
    noise, x_cf = _noise(jax.random.key(0), np.arange(B))
    assert noise.shape == (B, *SHAPE) and noise.dtype == np.float32
    assert noise.min() >= 0.0 and noise.max() < 1.0
    assert 0.45 < noise.mean() < 0.55
    assert np.unique(noise).size > 0.99 * noise.size
    np.testing.assert_array_equal(x_cf, noise)  # zero inputs


def test_noise_is_fixed_per_item_id():
    key = jax.random.key(1)
    full, _ = _noise(key, np.arange(B))
    # Another batch composition: other order, repeated items, other neighbours.
    ids = np.random.default_rng(0).integers(0, B, B)
    assert np.unique(ids).size < B
    subset, _ = _noise(key, ids)
    np.testing.assert_array_equal(subset, full[ids])
    # Different items, different noise; different key, different noise.
    assert not np.array_equal(full[0], full[1])
    other, _ = _noise(jax.random.key(2), np.arange(B))
    assert not np.array_equal(other, full)


def test_counterfactual_inputs_add_noise_without_clipping():
    key = jax.random.key(4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, *SHAPE)).astype(np.float32) + 0.9
    ids = rng.permutation(1000)[:B]
    noise, x_cf = _noise(key, ids, x)
    assert x_cf.shape == x.shape and x_cf.dtype == np.float32
    np.testing.assert_allclose(x_cf, x + noise, rtol=0, atol=1e-6)
    assert x_cf.max() > 1.0  # no clipping to the image range
    # The same item in another batch (other position, other neighbours) gets the same noise.
    ids2 = np.roll(ids, 5)
    x2 = rng.normal(size=x.shape).astype(np.float32)
    _, again = _noise(key, ids2, x2)
    np.testing.assert_allclose(again[5:] - x2[5:], x_cf[:-5] - x[:-5], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- keys, jit, errors


def test_deterministic_by_seed():
    rng = np.random.default_rng(0)
    y_f, y_s = rng.integers(0, 10, N), rng.integers(0, 10, N)
    a = _make(21, y_f, y_s, 10)
    b = _make(21, y_f, y_s, 10)
    c = _make(22, y_f, y_s, 10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("num_classes", [1, 0, -2])
def test_num_classes_below_two(num_classes):
    with pytest.raises(ValueError, match=f"num_classes must be >= 2, got {num_classes}"):
        _make(0, np.zeros(3, np.int32), np.zeros(3, np.int32), num_classes)


@pytest.mark.parametrize(
    ("n_forget", "n_sample", "message"),
    [(0, 5, "n_forget=0"), (5, 0, "n_sample=0"), (0, 0, "n_forget=0, n_sample=0")],
)
def test_empty_sets(n_forget, n_sample, message):
    with pytest.raises(ValueError, match=message):
        _make(0, np.zeros(n_forget, np.int32), np.zeros(n_sample, np.int32), 10)
