"""Known-answer tests for camu_jax.metrics."""

import numpy as np
import pytest

from camu_jax import metrics


def _confident(n, classes=10, seed=0):
    """Softmax rows with all mass on one class: a memorised training member."""
    rng = np.random.default_rng(seed)
    return np.eye(classes)[rng.integers(0, classes, n)]


def _spread(n, classes=10, seed=1):
    """Softmax rows spread over the classes: an unseen example."""
    return np.random.default_rng(seed).dirichlet(np.ones(classes), n)


def test_mia_backend_is_recorded():
    assert metrics.MIA_BACKEND in ("xgboost", "sklearn-gradient-boosting")


def test_accuracy_with_and_without_mask():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 1, 1, 0])
    assert metrics.accuracy(logits_or_probs=logits, labels=labels) == 50.0
    mask = np.array([True, True, False, False])
    assert metrics.accuracy(logits_or_probs=logits, labels=labels, mask=mask) == 100.0
    assert np.isnan(metrics.accuracy(logits_or_probs=logits, labels=labels, mask=np.zeros(4, bool)))


def test_softmax_is_stable_and_normalised():
    p = metrics.softmax(logits=np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]]))
    np.testing.assert_allclose(p, [[0.5, 0.5], [0.25, 0.75]])


def test_cross_entropy_logits_and_probs_agree_and_are_safe():
    logits = np.array([[1000.0, 0.0], [0.0, 0.0]])
    labels = np.array([0, 1])
    ce = metrics.per_example_cross_entropy(probs_or_logits=logits, labels=labels)
    np.testing.assert_allclose(ce, [0.0, np.log(2.0)], atol=1e-12)
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    ce_p = metrics.per_example_cross_entropy(probs_or_logits=probs, labels=labels)
    np.testing.assert_allclose(ce_p, [0.0, np.log(2.0)], atol=1e-12)
    worst = metrics.per_example_cross_entropy(probs_or_logits=probs, labels=np.array([1, 0]))
    assert np.isfinite(worst).all() and worst[0] == pytest.approx(-np.log(1e-12))


def test_loss_attack_perfect_attacker():
    rng = np.random.default_rng(0)
    score = metrics.loss_attack(forget_losses=np.zeros(300), test_losses=rng.uniform(0.5, 3.0, 500))
    assert score > 0.97


def test_loss_attack_identical_distributions():
    rng = np.random.default_rng(1)
    score = metrics.loss_attack(
        forget_losses=rng.exponential(1.0, 1000), test_losses=rng.exponential(1.0, 1000)
    )
    assert 0.4 < score < 0.6


def test_loss_attack_rejects_tiny_sets():
    with pytest.raises(ValueError, match="10"):
        metrics.loss_attack(forget_losses=np.zeros(5), test_losses=np.ones(50))


def test_reference_mia_perfect_attacker():
    acc = metrics.reference_mia(
        sample_probs=_confident(1000),
        test_probs=_spread(2000),
        forget_probs=_confident(500, seed=2),
        n_train=1000,
    )
    assert acc > 98.0


def test_reference_mia_identical_distributions():
    acc = metrics.reference_mia(
        sample_probs=_spread(1000, seed=3),
        test_probs=_spread(2000),
        forget_probs=_spread(500, seed=4),
        n_train=1000,
    )
    assert 40.0 < acc < 60.0


def test_reference_mia_split_plan():
    # MNIST class 0: 4000 vs the first 4000 test outputs, eval on the next |D_f| = 5923.
    assert metrics._reference_mia_split(
        n_sample=5923, n_test=10000, n_forget=5923, n_train=4000
    ) == (4000, 4000, 9923)
    # sklearn digits: too few test outputs, so half fit the attack and half evaluate it.
    assert metrics._reference_mia_split(n_sample=180, n_test=360, n_forget=180, n_train=4000) == (
        180,
        180,
        360,
    )


def test_reference_mia_small_sets_still_separate():
    acc = metrics.reference_mia(
        sample_probs=_confident(180), test_probs=_spread(360), forget_probs=_confident(180, seed=5)
    )
    assert acc > 95.0


def test_mia_efficacy_non_member_forget_set():
    classes, rng = 10, np.random.default_rng(0)
    remain_labels = rng.integers(0, classes, 400)
    test_labels = rng.integers(0, classes, 300)
    forget_labels = rng.integers(0, classes, 200)
    remain = np.eye(classes)[remain_labels]  # members: true-label confidence 1
    test = _spread(300, seed=6)  # non-members: confidence ~ 0.1
    forget = _spread(200, seed=7)
    eff = metrics.mia_efficacy(
        remain_probs=remain,
        remain_labels=remain_labels,
        test_probs=test,
        test_labels=test_labels,
        forget_probs=forget,
        forget_labels=forget_labels,
    )
    assert eff > 95.0
    # The same attack calls a memorised forget set members: efficacy near 0.
    eff_member = metrics.mia_efficacy(
        remain_probs=remain,
        remain_labels=remain_labels,
        test_probs=test,
        test_labels=test_labels,
        forget_probs=np.eye(classes)[forget_labels],
        forget_labels=forget_labels,
    )
    assert eff_member < 5.0


def test_unlearning_scores_and_avg_gap():
    s = metrics.unlearning_scores(forget_acc=2.0, remain_acc=99.0, test_acc=90.0, mia_efficacy=95.0)
    assert s == {"UA": 98.0, "RA": 99.0, "TA": 90.0, "mia_efficacy": 95.0}
    assert metrics.avg_gap(s, s) == 0.0
    r = {"UA": 100.0, "RA": 100.0, "TA": 89.0, "mia_efficacy": 99.0}
    # |98-100| + |99-100| + |90-89| + |95-99| = 2 + 1 + 1 + 4 = 8, mean 2.
    assert metrics.avg_gap(s, r) == pytest.approx(2.0)
    assert metrics.avg_gap(s, r, keys=("UA",)) == pytest.approx(2.0)


def test_rte():
    assert metrics.rte(retrain_seconds=60.0, unlearn_seconds=4.0) == 15.0
    with pytest.raises(ValueError, match="unlearn_seconds"):
        metrics.rte(retrain_seconds=60.0, unlearn_seconds=0.0)
    with pytest.raises(ValueError, match="retrain_seconds"):
        metrics.rte(retrain_seconds=-1.0, unlearn_seconds=4.0)


def test_mean_std_is_population_std():
    mean, std = metrics.mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert std == pytest.approx(np.sqrt(1.25))  # ddof=0; ddof=1 would give 1.29
    with pytest.raises(ValueError):
        metrics.mean_std([])


@pytest.mark.parametrize(
    ("sizes", "inapplicable"),
    [
        ({"n_forget": 3, "n_sample": 3, "n_remain": 1434, "n_test": 360}, {"loss_attack"}),
        ({"n_forget": 9, "n_sample": 9, "n_remain": 1428, "n_test": 360}, {"loss_attack"}),
        ({"n_forget": 10, "n_sample": 10, "n_remain": 1427, "n_test": 360}, set()),
        (
            {"n_forget": 500, "n_sample": 500, "n_remain": 4000, "n_test": 1},
            {"reference_mia"} | {"loss_attack"},
        ),
        (
            {"n_forget": 0, "n_sample": 0, "n_remain": 100, "n_test": 100},
            {"reference_mia", "mia_efficacy", "loss_attack"},
        ),
    ],
)
def test_inapplicable_attacks_is_the_rule_the_attacks_enforce(sizes, inapplicable):
    """The up-front rule says exactly which attacks would raise on sets of these sizes."""
    why = metrics.inapplicable_attacks(**sizes)
    assert set(why) == inapplicable
    rng = np.random.default_rng(0)
    probs = {
        k: _spread(sizes[f"n_{k}"], seed=i)
        for i, k in enumerate(("forget", "sample", "remain", "test"))
    }
    labels = {k: p.argmax(1) if len(p) else np.zeros(0, int) for k, p in probs.items()}
    calls = {
        "reference_mia": lambda: metrics.reference_mia(
            sample_probs=probs["sample"], test_probs=probs["test"], forget_probs=probs["forget"]
        ),
        "mia_efficacy": lambda: metrics.mia_efficacy(
            remain_probs=probs["remain"],
            remain_labels=labels["remain"],
            test_probs=probs["test"],
            test_labels=labels["test"],
            forget_probs=probs["forget"],
            forget_labels=labels["forget"],
        ),
        "loss_attack": lambda: metrics.loss_attack(
            forget_losses=rng.uniform(size=sizes["n_forget"]),
            test_losses=rng.uniform(size=sizes["n_test"]),
        ),
    }
    for name, call in calls.items():
        if name in inapplicable:
            with pytest.raises(ValueError):
                call()
            assert why[name]
        else:
            assert np.isfinite(call())
