"""The CaMU losses (`camu_jax.losses`) against float64 numpy on small arrays."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from camu_jax import losses

RTOL = 1e-5

# Jitted once per shape (eager JAX compiles every primitive separately, which is slow on CPU),
# at XLA's lowest optimisation level (same results, less compile time).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
kl_sum = jit(losses.kl_sum)
cross_entropy_mean = jit(losses.cross_entropy_mean)
representation_loss = jit(losses.representation_loss)
output_loss = jit(losses.output_loss)


def _grad(fn):
    return jit(jax.grad(fn))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), -1, keepdims=True))


def _np_kl_rows(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """Per-row sum_j p_j (log p_j - log_softmax(student)_j), p = softmax(teacher), 0 log 0 = 0."""
    log_p = _log_softmax(teacher)
    p = np.exp(log_p)
    terms = np.where(p > 0, p * (log_p - _log_softmax(student)), 0.0)
    return terms.sum(-1)


def _np_nll(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return -_log_softmax(logits)[np.arange(len(labels)), labels]


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    return {
        "s": rng.normal(size=(2, 3)).astype(np.float32),
        "t": rng.normal(size=(2, 3)).astype(np.float32),
        "s2": rng.normal(size=(4, 5)).astype(np.float32) * 3,
        "t2": rng.normal(size=(4, 5)).astype(np.float32) * 3,
        "logits": rng.normal(size=(4, 5)).astype(np.float32) * 2,
        "labels": np.array([0, 4, 2, 2], np.int32),
    }


# ---------------------------------------------------------------------------- kl_sum


def test_kl_sum_by_hand_2x3():
    s = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
    t = np.array([[3.0, 2.0, 1.0], [1.0, 0.0, -1.0]], np.float32)
    # Row 0: p = softmax(3,2,1), log q = (1,2,3) - lse(1,2,3); sum p (log p - log q).
    lse = np.log(np.exp(1) + np.exp(2) + np.exp(3))
    p0 = np.exp(np.array([3, 2, 1]) - lse)
    row0 = np.sum(p0 * ((np.array([3, 2, 1]) - lse) - (np.array([1, 2, 3]) - lse)))
    # Row 1: q uniform, so KL = sum p log p + log 3.
    p1 = np.exp(np.array([1, 0, -1]) - lse + 2)  # lse(1,0,-1) = lse(3,2,1) - 2
    row1 = np.sum(p1 * np.log(p1)) + np.log(3)
    got = kl_sum(student_embedding=jnp.asarray(s), teacher_embedding=jnp.asarray(t))
    np.testing.assert_allclose(float(got), row0 + row1, rtol=RTOL)


@pytest.mark.parametrize("shape", ["s", "s2"])
def test_kl_sum_matches_numpy(arrays, shape):
    s, t = arrays[shape], arrays["t" + shape[1:]]
    got = kl_sum(student_embedding=s, teacher_embedding=t)
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), _np_kl_rows(s, t).sum(), rtol=RTOL)
    assert float(got) > 0


def test_kl_sum_is_not_symmetric(arrays):
    s, t = arrays["s2"], arrays["t2"]
    forward = float(kl_sum(student_embedding=s, teacher_embedding=t))
    backward = float(kl_sum(student_embedding=t, teacher_embedding=s))
    np.testing.assert_allclose(backward, _np_kl_rows(t, s).sum(), rtol=RTOL)
    assert abs(forward - backward) > 1e-3


def test_kl_sum_zero_when_student_equals_teacher(arrays):
    s = arrays["s2"]
    assert abs(float(kl_sum(student_embedding=s, teacher_embedding=s))) < 1e-6
    # Softmax is shift invariant per row: shifted embeddings are the same distribution.
    shifted = s + np.array([[1.0], [-2.0], [30.0], [0.5]], np.float32)
    assert abs(float(kl_sum(student_embedding=shifted, teacher_embedding=s))) < 1e-5


def test_kl_sum_teacher_probability_zero():
    # exp(-1e4) underflows to exactly 0 in float32: the 0 * log 0 term must be 0, not NaN.
    t = np.array([[0.0, -1e4, 1.0], [-1e4, 2.0, -1e4]], np.float32)
    s = np.array([[0.5, 3.0, -1.0], [1.0, -2.0, 0.0]], np.float32)
    assert np.exp(np.float32(-1e4)) == 0.0
    got = kl_sum(student_embedding=s, teacher_embedding=t)
    assert np.isfinite(float(got))
    np.testing.assert_allclose(float(got), _np_kl_rows(s, t).sum(), rtol=RTOL)
    # Gradient w.r.t. the student is finite too: softmax(s) - p per row.
    grad = _grad(lambda x: losses.kl_sum(student_embedding=x, teacher_embedding=t))(s)
    expected = np.exp(_log_softmax(s)) - np.exp(_log_softmax(t))
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=RTOL, atol=1e-6)
    # Teacher == student with zero probabilities: still exactly representable as 0 loss.
    assert abs(float(kl_sum(student_embedding=t, teacher_embedding=t))) < 1e-6


def test_kl_sum_large_negative_student_logits_are_finite():
    s = np.array([[-1e4, 0.0, 0.0], [0.0, -1e4, 5.0]], np.float32)
    t = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]], np.float32)
    got = float(kl_sum(student_embedding=s, teacher_embedding=t))
    np.testing.assert_allclose(got, _np_kl_rows(s, t).sum(), rtol=RTOL)
    assert got > 1e3  # the teacher puts mass where the student has ~none


def test_kl_sum_weights_drop_rows(arrays):
    s, t = arrays["s2"], arrays["t2"]
    w = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
    got = kl_sum(student_embedding=s, teacher_embedding=t, weights=w)
    np.testing.assert_allclose(float(got), _np_kl_rows(s, t)[[0, 2]].sum(), rtol=RTOL)
    kept_only = kl_sum(student_embedding=s[[0, 2]], teacher_embedding=t[[0, 2]])
    np.testing.assert_allclose(float(got), float(kept_only), rtol=RTOL)
    # A sum, not a mean: all-ones weights equal no weights, all zeros give 0.
    ones = kl_sum(student_embedding=s, teacher_embedding=t, weights=np.ones(4, np.float32))
    none = kl_sum(student_embedding=s, teacher_embedding=t)
    np.testing.assert_allclose(float(ones), float(none), rtol=1e-6)
    zeros = kl_sum(student_embedding=s, teacher_embedding=t, weights=np.zeros(4, np.float32))
    assert float(zeros) == 0.0


def test_kl_sum_no_gradient_to_teacher(arrays):
    s, t = arrays["s2"], arrays["t2"]
    g_teacher = _grad(lambda x: losses.kl_sum(student_embedding=s, teacher_embedding=x))(t)
    np.testing.assert_array_equal(np.asarray(g_teacher), 0.0)
    g_student = _grad(lambda x: losses.kl_sum(student_embedding=x, teacher_embedding=t))(s)
    expected = np.exp(_log_softmax(s)) - np.exp(_log_softmax(t))
    np.testing.assert_allclose(np.asarray(g_student), expected, rtol=RTOL, atol=1e-6)


def test_kl_sum_weighted_gradient_ignores_dropped_rows(arrays):
    s, t = arrays["s2"], arrays["t2"]
    w = np.array([0.0, 1.0, 1.0, 0.0], np.float32)
    g = np.asarray(
        _grad(lambda x: losses.kl_sum(student_embedding=x, teacher_embedding=t, weights=w))(s)
    )
    np.testing.assert_array_equal(g[[0, 3]], 0.0)
    assert np.all(np.abs(g[[1, 2]]).sum(-1) > 0)


def test_losses_are_keyword_only(arrays):
    with pytest.raises(TypeError):
        losses.kl_sum(arrays["s"], arrays["t"])  # type: ignore[misc]
    with pytest.raises(TypeError):
        losses.cross_entropy_mean(arrays["logits"], arrays["labels"])  # type: ignore[misc]


# ---------------------------------------------------------------------------- cross entropy


def test_cross_entropy_by_hand_2x3():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
    labels = np.array([2, 1], np.int32)
    lse = np.log(np.exp(1) + np.exp(2) + np.exp(3))
    expected = ((lse - 3.0) + np.log(3.0)) / 2
    got = cross_entropy_mean(logits=logits, labels=labels)
    np.testing.assert_allclose(float(got), expected, rtol=RTOL)


def test_cross_entropy_matches_numpy(arrays):
    logits, labels = arrays["logits"], arrays["labels"]
    got = cross_entropy_mean(logits=logits, labels=labels)
    assert got.shape == ()
    np.testing.assert_allclose(float(got), _np_nll(logits, labels).mean(), rtol=RTOL)


def test_cross_entropy_weighted_mean_is_mean_over_kept_rows(arrays):
    logits, labels = arrays["logits"], arrays["labels"]
    w = np.array([1.0, 0.0, 1.0, 1.0], np.float32)
    got = cross_entropy_mean(logits=logits, labels=labels, weights=w)
    np.testing.assert_allclose(float(got), _np_nll(logits, labels)[[0, 2, 3]].mean(), rtol=RTOL)
    short = cross_entropy_mean(logits=logits[[0, 2, 3]], labels=labels[[0, 2, 3]])
    np.testing.assert_allclose(float(got), float(short), rtol=RTOL)
    # Garbage (finite) values in dropped rows change nothing.
    garbage = logits.copy()
    garbage[1] = [1e3, -1e3, 7.0, 0.0, 50.0]
    again = cross_entropy_mean(logits=garbage, labels=labels, weights=w)
    assert float(again) == float(got)


def test_cross_entropy_all_dropped_is_zero(arrays):
    got = cross_entropy_mean(
        logits=arrays["logits"], labels=arrays["labels"], weights=np.zeros(4, np.float32)
    )
    assert float(got) == 0.0


def test_cross_entropy_gradient(arrays):
    logits, labels = arrays["logits"], arrays["labels"]
    w = np.array([1.0, 1.0, 0.0, 1.0], np.float32)
    g = _grad(lambda x: losses.cross_entropy_mean(logits=x, labels=labels, weights=w))(logits)
    expected = np.exp(_log_softmax(logits))
    expected[np.arange(4), labels] -= 1.0
    expected = expected * w[:, None] / w.sum()
    np.testing.assert_allclose(np.asarray(g), expected, rtol=RTOL, atol=1e-7)


def test_cross_entropy_accepts_int64_labels(arrays):
    got = cross_entropy_mean(logits=arrays["logits"], labels=arrays["labels"].astype(np.int64))
    np.testing.assert_allclose(
        float(got), _np_nll(arrays["logits"], arrays["labels"]).mean(), rtol=RTOL
    )


# ---------------------------------------------------------------------------- combinations


def test_representation_loss_default_and_custom_coefficients(arrays):
    rng = np.random.default_rng(1)
    zs, z0s, zf, z0cf = (rng.normal(size=(4, 6)).astype(np.float32) for _ in range(4))
    ws = np.array([1, 1, 1, 0], np.float32)
    wf = np.array([1, 0, 1, 1], np.float32)
    kl_s = _np_kl_rows(zs, z0s)[ws > 0].sum()
    kl_f = _np_kl_rows(zf, z0cf)[wf > 0].sum()
    kwargs = dict(
        student_sample=zs,
        teacher_sample=z0s,
        student_forget=zf,
        teacher_counterfactual=z0cf,
        sample_weights=ws,
        forget_weights=wf,
    )
    np.testing.assert_allclose(
        float(representation_loss(**kwargs)), 0.5 * kl_s + 0.5 * kl_f, rtol=RTOL
    )
    np.testing.assert_allclose(
        float(representation_loss(**kwargs, sample_coef=0.2, forget_coef=1.7)),
        0.2 * kl_s + 1.7 * kl_f,
        rtol=RTOL,
    )
    # The forget term compares the student on x_f with the teacher on x_cf (not swapped).
    only_forget = representation_loss(**kwargs, sample_coef=0.0, forget_coef=1.0)
    np.testing.assert_allclose(float(only_forget), kl_f, rtol=RTOL)
    # Without weights every row counts.
    unweighted = representation_loss(
        student_sample=zs, teacher_sample=z0s, student_forget=zf, teacher_counterfactual=z0cf
    )
    expected = 0.5 * _np_kl_rows(zs, z0s).sum() + 0.5 * _np_kl_rows(zf, z0cf).sum()
    np.testing.assert_allclose(float(unweighted), expected, rtol=RTOL)


def test_representation_loss_no_gradient_to_teachers():
    rng = np.random.default_rng(2)
    zs, z0s, zf, z0cf = (rng.normal(size=(3, 4)).astype(np.float32) for _ in range(4))

    def loss(teachers):
        return losses.representation_loss(
            student_sample=zs,
            teacher_sample=teachers[0],
            student_forget=zf,
            teacher_counterfactual=teachers[1],
        )

    grads = _grad(loss)((z0s, z0cf))
    for g in grads:
        np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_output_loss_default_and_custom_coefficients(arrays):
    rng = np.random.default_rng(3)
    ls, lf = (rng.normal(size=(4, 5)).astype(np.float32) * 2 for _ in range(2))
    ys = np.array([0, 1, 2, 3], np.int32)
    ycf = np.array([4, 4, 0, 1], np.int32)
    ws = np.array([1, 0, 1, 1], np.float32)
    wf = np.array([1, 1, 0, 0], np.float32)
    ce_s = _np_nll(ls, ys)[ws > 0].mean()
    ce_f = _np_nll(lf, ycf)[wf > 0].mean()
    kwargs = dict(
        sample_logits=ls,
        sample_labels=ys,
        forget_logits=lf,
        counterfactual_labels=ycf,
        sample_weights=ws,
        forget_weights=wf,
    )
    np.testing.assert_allclose(float(output_loss(**kwargs)), 0.9 * ce_s + 0.01 * ce_f, rtol=RTOL)
    np.testing.assert_allclose(
        float(output_loss(**kwargs, sample_coef=0.3, forget_coef=2.0)),
        0.3 * ce_s + 2.0 * ce_f,
        rtol=RTOL,
    )
    # The forget term uses the counterfactual labels on the forget logits.
    only_forget = output_loss(**kwargs, sample_coef=0.0, forget_coef=1.0)
    np.testing.assert_allclose(float(only_forget), ce_f, rtol=RTOL)
    unweighted = output_loss(
        sample_logits=ls, sample_labels=ys, forget_logits=lf, counterfactual_labels=ycf
    )
    np.testing.assert_allclose(
        float(unweighted), 0.9 * _np_nll(ls, ys).mean() + 0.01 * _np_nll(lf, ycf).mean(), rtol=RTOL
    )
