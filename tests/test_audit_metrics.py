"""Golden tests of the audit metrics (`camu_jax.audits`).

Each metric's numpy reference (`camu_jax.audits.reference`, transliterated from the official
code) is checked on synthetic phi where the answer is known, and the device version
(`camu_jax.audits.metrics`) against the reference on random phi, edge cases included.

Tolerances are derived, never fitted:

* Device against reference, float64: comparisons, sorts, medians and counts are exact; what
  differs is each side's rounding of a few divisions, logarithms and sums (XLA:CPU's float64
  division and log may be a few ulps off numpy's). A quantity built from k such operations on
  terms of magnitude T errs by at most about k * eps64 * T: the bounds below take k = 64.
* Known answers: LiRA's AUC and accuracy on shifted Gaussians from the normal CDF, within
  4 standard errors (Hanley-McNeil for the AUC, binomial for the accuracy) plus the bias the
  fitted medians' noise can cause; KLOM of two samples of one distribution from its chi-square
  approximation (KL(p^ || q^) ~ chi2_{B-1} / N); epsilon of two samples of one distribution
  from the Dvoretzky-Kiefer-Wolfowitz bound on each sample's CDF.
"""

from __future__ import annotations

import math
import warnings

import jax
import numpy as np
import pytest
from scipy import stats

from camu_jax import engine, sharding
from camu_jax.audits import metrics as device
from camu_jax.audits import reference
from camu_jax.audits.phi import logit_scaled_confidence, population_phi
from camu_jax.data.pipeline import DeviceData, InputSpec
from camu_jax.models import create_model, init_variables
from camu_jax.prediction import predict

EPS64 = np.finfo(np.float64).eps
EPS32 = np.finfo(np.float32).eps
K = 64  # float64 operations a compared quantity may round in (module docstring)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _same_nan(a, b):
    assert np.array_equal(np.isnan(a), np.isnan(b))
    assert np.array_equal(np.isinf(a), np.isinf(b))


# ----------------------------------------------------------------------------------- phi


def test_phi_equals_the_official_confidence_within_float32_rounding():
    rng = np.random.default_rng(0)
    classes = 10
    logits = (rng.normal(size=(500, classes)) * 8).astype(np.float32)
    labels = rng.integers(0, classes, 500)
    ours = np.asarray(logit_scaled_confidence(logits=logits, labels=labels), np.float64)
    ref = reference.logit_scaled_confidence(logits, labels)
    # |z| <= 8 * 4.5 here, so p_y and 1 - p_y stay far above the reference's 1e-45 floor. Our
    # float32 margin rounds z_y - m, C exponentials, their sum (C terms), a log and two
    # subtractions: at most (C + 4) eps32 times the magnitudes involved.
    big = np.abs(logits).max(1)
    bound = (
        (classes + 4)
        * EPS32
        * (np.abs(logits[np.arange(500), labels]) + 2 * big + np.abs(ref) + np.log(classes))
    )
    assert np.all(np.abs(ours - ref) <= bound)


def test_phi_is_the_margin_and_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 2000.0, 1999.0]], np.float32)
    phi = np.asarray(logit_scaled_confidence(logits=logits, labels=np.array([0, 2])))
    assert phi[0] == pytest.approx(1000.0)  # z_y - logsumexp(0, -1000)
    assert phi[1] == pytest.approx(-1.0 - math.log1p(math.exp(-1999.0)) - 0.0, abs=1e-3)
    assert np.isfinite(phi).all()


def test_population_phi_is_one_pass_over_the_population_with_missing_models():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, 8, 8, 1)).astype(np.uint8)
    labels = rng.integers(0, 10, 40).astype(np.int32)
    data = DeviceData.put(images, labels, spec=InputSpec(), mesh=sharding.make_mesh())
    model = create_model("cnn", num_classes=10)
    v = [init_variables(model, jax.random.key(s), (8, 8, 1)) for s in (0, 1)]
    out = population_phi(model, [v[0], None, v[1]], data, log=None)
    assert out["valid"].tolist() == [True, False, True]
    assert np.isnan(out["phi"][1]).all() and not out["correct"][1].any()
    # The same program (two members) gives the same logits; the reference's phi from them.
    stacked = sharding.shard_members(engine.stack(v), data.mesh)
    logits = predict(model, stacked, data)
    for row, lg in zip((0, 2), logits, strict=True):
        ref = reference.logit_scaled_confidence(lg, labels)
        bound = 14 * EPS32 * (3 * np.abs(lg).max(1) + np.abs(ref) + np.log(10))
        assert np.all(np.abs(out["phi"][row] - ref) <= bound)
        assert np.array_equal(out["correct"][row], lg.argmax(1) == labels)


# ---------------------------------------------------------------------------------- LiRA


def _lira_bound(phi, member, nonmember, valid, variance):
    """K eps64 times the largest log-density term: z^2 / 2 + |log s| + log sqrt(2 pi), with z
    the phi range over the smallest spread s a fit can have."""
    phi = np.asarray(phi)[valid]
    span = phi.max() - phi.min()
    if variance == "global":
        s = np.std(np.asarray(phi)[np.asarray(member)[valid]])
    else:
        spreads = []
        for mask in (member, nonmember):
            m = np.asarray(mask)[valid]
            for x in range(phi.shape[1]):
                col = phi[m[:, x], x]
                # Leaving one model out of a set: every sub-sample of size k - 1.
                spreads += [np.std(np.delete(col, i)) for i in range(len(col)) if len(col) > 2]
        s = min(v for v in spreads if v > 0)
    terms = (span / s) ** 2 / 2 + abs(math.log(s)) + 1.0
    return K * EPS64 * 2 * terms


@pytest.mark.parametrize("variance", ["global", "per_example"])
def test_lira_device_equals_reference(variance):
    rng = np.random.default_rng(2)
    models, examples = 14, 40
    phi = rng.normal(size=(models, examples)) * 2 + rng.normal(size=examples) * 3
    trained = rng.random((models, examples)) < 0.5
    member = trained & (rng.random((models, examples)) < 0.6)
    nonmember = ~trained
    valid = np.ones(models, bool)
    valid[5] = False
    phi[5] = np.nan  # a diverged model's row
    ref = reference.lira_scores(
        phi, member=member, nonmember=nonmember, valid=valid, variance=variance
    )
    ours = device.lira_scores(
        phi, member=member, nonmember=nonmember, valid=valid, variance=variance
    )
    _same_nan(ref, ours)
    assert np.isfinite(ref).sum() > examples  # most (target, example) pairs scored
    bound = _lira_bound(phi, member, nonmember, valid, variance)
    assert np.nanmax(np.abs(ref - ours)) <= bound


def _gaussian_design(models, examples, shift, seed):
    rng = np.random.default_rng(seed)
    member = np.zeros((models, examples), bool)
    for x in range(examples):
        member[rng.permutation(models)[: models // 2], x] = True
    centres = rng.normal(size=examples) * 3
    phi = centres + shift * member + rng.normal(size=(models, examples))
    return phi, member, ~member


def _hanley_mcneil(auc, n1, n2):
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    return math.sqrt(
        (auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n2 - 1) * (q2 - auc**2)) / (n1 * n2)
    )


@pytest.mark.parametrize("impl", [reference, device], ids=["reference", "device"])
def test_lira_on_shifted_gaussians_matches_the_normal_cdf(impl):
    models, examples, d = 400, 50, 1.0
    phi, member, nonmember = _gaussian_design(models, examples, d, seed=3)
    scores = impl.lira_scores(phi, member=member, nonmember=nonmember, variance="global")
    s = device.attack_summary(scores, member=member, nonmember=nonmember)
    n1, n2 = s["n_positive"], s["n_negative"]
    # The exact likelihood ratio of N(mu + d, 1) against N(mu, 1) ranks by phi - mu: AUC
    # Phi(d / sqrt 2), and its sign test is right with probability Phi(d / 2) on each side.
    # The fitted medians of k = models / 2 - 1 samples err by about sqrt(pi / 2 / k) each, the
    # midpoint by v = pi / 4 / k in variance, which at most blurs phi - mu by that much.
    v = math.pi / 4 / (models / 2 - 1)
    auc = stats.norm.cdf(d / math.sqrt(2))
    auc_bias = auc - stats.norm.cdf(d / math.sqrt(2 * (1 + 2 * v)))
    assert abs(s["auc"] - auc) <= 4 * _hanley_mcneil(auc, n1, n2) + auc_bias
    acc = stats.norm.cdf(d / 2)
    acc_bias = acc - stats.norm.cdf(d / 2 / math.sqrt(1 + v))
    band = 4 * math.sqrt(acc * (1 - acc) * (1 / n1 + 1 / n2)) / 2
    assert abs(s["accuracy"] - acc) <= band + acc_bias
    # The summary is the official sweep's: the same ROC, AUC, best accuracy and low-FPR TPRs.
    pos, neg = scores[member & np.isfinite(scores)], scores[nonmember & np.isfinite(scores)]
    answers = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]
    fpr, tpr, ref_auc, ref_acc = reference.sweep(np.r_[pos, neg], answers)
    assert s["auc"] == ref_auc and s["best_accuracy"] == ref_acc
    assert s["tpr_at_fpr"]["0.01"] == reference.tpr_at_fpr(fpr, tpr, 0.01)
    assert s["tpr_at_fpr"]["0.001"] == reference.tpr_at_fpr(fpr, tpr, 0.001)


@pytest.mark.parametrize("impl", [reference, device], ids=["reference", "device"])
def test_lira_on_identical_distributions_is_chance(impl):
    phi, member, nonmember = _gaussian_design(64, 200, 0.0, seed=4)
    scores = impl.lira_scores(phi, member=member, nonmember=nonmember, variance="global")
    s = device.attack_summary(scores, member=member, nonmember=nonmember)
    n1, n2 = s["n_positive"], s["n_negative"]
    # No signal: each side's sign test is a fair coin; 4 binomial standard errors.
    assert abs(s["accuracy"] - 0.5) <= 4 * 0.25 * math.sqrt(1 / n1 + 1 / n2)
    assert abs(s["auc"] - 0.5) <= 4 * math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))
    # The reported 99 % bands are these with Z99 for 4.
    assert s["accuracy_band"] == pytest.approx(device.Z99 * 0.25 * math.sqrt(1 / n1 + 1 / n2))


def test_lira_variance_auto_needs_32_models_a_side():
    member = np.zeros((64, 3), bool)
    member[:32] = True
    assert device.lira_variance(member, ~member, np.ones(64, bool)) == "per_example"
    valid = np.ones(64, bool)
    valid[0] = False
    assert device.lira_variance(member, ~member, valid) == "global"


def test_attack_summary_without_targets_is_empty():
    s = device.attack_summary(
        np.full((2, 3), np.nan), member=np.ones((2, 3), bool), nonmember=np.zeros((2, 3), bool)
    )
    assert s["n_positive"] == 0 and s["auc"] is None and s["roc"] is None


# ---------------------------------------------------------------------------------- KLOM


def test_klom_device_equals_reference():
    rng = np.random.default_rng(5)
    p = rng.normal(size=(10, 60)) * rng.uniform(0.2, 30, 60)
    q = rng.normal(size=(13, 60)) * rng.uniform(0.2, 30, 60) + rng.normal(size=60)
    p[:, 0], q[:, 0] = 3.0, np.minimum(q[:, 0], 2.0)
    # ^ p all at the joint maximum: past the last bin, an empty histogram (NaN)
    p[:, 1] = q[:, 1] = 1.0  # one value: the range becomes [1, 2]
    q[:4, 2] = 500.0  # clipped to 100
    p[:, 3] = np.round(p[:, 3])  # ties on bin edges
    ref = reference.klom(p, q)
    ours = device.klom(p, q)
    _same_nan(ref, ours)
    assert np.isnan(ref[0]) and ref[1] == 0.0
    # 20 terms of magnitude <= |log 1e-5| + log 20 each.
    assert np.nanmax(np.abs(ref - ours)) <= K * EPS64 * 20 * (abs(math.log(1e-5)) + math.log(20))


@pytest.mark.parametrize("impl", [reference, device], ids=["reference", "device"])
def test_klom_of_identical_samples_is_zero(impl):
    x = np.random.default_rng(6).normal(size=(32, 25)) * 5
    assert np.all(impl.klom(x, x.copy()) == 0.0)


@pytest.mark.parametrize("impl", [reference, device], ids=["reference", "device"])
def test_klom_of_one_distribution_is_within_its_chi_square_bound(impl):
    rng = np.random.default_rng(7)
    n, examples, bins = 4000, 20, 20
    kl = impl.klom(rng.uniform(size=(n, examples)), rng.uniform(size=(n, examples)))
    # Two multinomial histograms of n draws over B equal-probability bins: KL(p^ || q^) =
    # 1/2 sum (p^ - q^)^2 / q + O(|p^ - q^|^3 / q^2) and (n / 2) sum (p^ - q^)^2 / q ~
    # chi2_{B-1}, so KL ~ chi2_{B-1} / n; the cubic term is relatively sqrt(2 B / n) = 0.1
    # at most here (a factor 1.5 covers it), and the quantile is per example at 1e-4 / X.
    bound = stats.chi2.ppf(1 - 1e-4 / examples, bins - 1) / n * 1.5
    assert np.all(kl <= bound)
    assert np.median(kl) <= stats.chi2.ppf(0.5, bins - 1) / n * 1.5


@pytest.mark.parametrize("impl", [reference, device], ids=["reference", "device"])
def test_klom_of_disjoint_samples_is_the_floor_s_log(impl):
    rng = np.random.default_rng(8)
    p = np.zeros((16, 5))  # every unlearned margin in the first bin
    q = rng.uniform(10, 11, size=(16, 5))  # no oracle mass there: q floored at 1e-5
    # KL = 1 * log(1 / (1e-5 / (1 + 1e-5))): the oracle's floored histogram renormalised.
    expected = math.log((1 + 1e-5) / 1e-5)
    assert np.allclose(impl.klom(p, q), expected, rtol=0, atol=K * EPS64 * expected)


# ------------------------------------------------------------------------------- epsilon


def test_epsilon_device_equals_reference():
    rng = np.random.default_rng(9)
    examples = 14
    u = rng.normal(size=(16, examples)) * rng.uniform(0.3, 3, examples)
    r = rng.normal(size=(20, examples)) * rng.uniform(0.3, 3, examples) + rng.normal(size=examples)
    u[:, 0] *= 1e-3  # a peaky sample: the cap outright
    u[:, 1] = np.round(u[:, 1] * 4) / 4  # ties
    r[:, 2] = u[:16, 2].mean() + 40  # far apart: perfect separation (inf, capped)
    u[:, 3] = r[:16, 3]  # equal medians: the unlearned side is positive
    f_ref, e_ref = reference.forget_score(u, r)
    e_dev = device.epsilons(u, r)
    _same_nan(e_ref, e_dev)
    assert e_ref[0] == e_ref[2] == reference.EPSILON_CAP
    # log(a) - log(b) of rates with a rounded division each: a few eps64 plus the ulps of eps.
    assert np.all(np.abs(e_ref - e_dev) <= 8 * EPS64 * (1 + np.abs(e_ref)))
    assert device.forget_score(e_dev, models=16) == pytest.approx(f_ref, abs=K * EPS64)


@pytest.mark.parametrize("impl", ["reference", "device"])
def test_epsilon_of_identical_samples_is_zero(impl):
    x = np.random.default_rng(10).normal(size=(32, 6)) * 2
    if impl == "reference":
        score, eps = reference.forget_score(x, x.copy())
    else:
        eps = device.epsilons(x, x.copy())
        score = device.forget_score(eps, models=32)
    # tpr = fpr and fnr = tnr at every threshold: log((1 - delta - f) / (1 - f)) < 0, clipped.
    assert np.all(eps == 0.0) and score == 1.0


@pytest.mark.parametrize("impl", ["reference", "device"])
def test_epsilon_of_one_distribution_is_within_the_dkw_bound(impl):
    rng = np.random.default_rng(11)
    n, examples, alpha = 400, 6, 1e-3
    u, r = rng.normal(size=(n, examples)), rng.normal(size=(n, examples))
    eps = reference.forget_score(u, r)[1] if impl == "reference" else device.epsilons(u, r)
    # DKW on each sample (alpha / 2 / examples each): each empirical CDF lies within
    # sqrt(log(4 X / alpha) / 2n) of the truth, so the two within D of each other and an
    # interval's rates within 2 D. An attack that counts is one whose error rates are >= 1/n
    # (else NaN, or inf when both are 0, impossible while 2 D < 1), so its ratios tnr / fnr
    # and tpr / fpr are <= (1/n + 2 D) / (1/n) and epsilon <= log(1 + 2 D n).
    d = 2 * math.sqrt(math.log(4 * examples / alpha) / (2 * n))
    assert 2 * d < 1  # no perfect separation possible
    assert np.all(eps <= math.log(1 + 2 * d * n))
    assert np.all(eps < reference.EPSILON_CAP)


@pytest.mark.parametrize("impl", ["reference", "device"])
def test_epsilon_of_disjoint_samples_is_the_cap(impl):
    rng = np.random.default_rng(12)
    u, r = rng.uniform(0, 1, size=(32, 5)), rng.uniform(10, 11, size=(32, 5))
    if impl == "reference":
        score, eps = reference.forget_score(u, r)
    else:
        eps = device.epsilons(u, r)
        score = device.forget_score(eps, models=32)
    assert np.all(eps == reference.EPSILON_CAP) and score == 0.0


def test_forget_score_buckets_as_the_challenge():
    # N = 64: buckets of 0.5 up to ceil(ln 63) = 5, worth 1, 1/2, ..., 1/512; beyond: 0.
    eps = np.array([0.0, 0.49, 0.5, 1.2, 4.99, 5.0, 50.0, np.nan])
    expected = (1 + 1 + 0.5 + 0.25 + 0.5**9) / len(eps)
    assert device.forget_score(eps, models=64) == pytest.approx(expected, abs=K * EPS64)
    assert device.final_score(
        0.5, ra_unlearned=90, ra_retrained=100, ta_unlearned=80, ta_retrained=100
    ) == pytest.approx(0.36)
