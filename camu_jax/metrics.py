"""Evaluation metrics for machine unlearning, as pure numpy functions on host arrays.

Three membership-inference attacks (MIA) are provided because the literature uses three:

* :func:`reference_mia` -- the CaMU reference code's XGBoost attack on sorted softmax outputs
  (``CaMU/train.py: train_attack_model, attack``); the number the CaMU paper reports.
* :func:`mia_efficacy` -- SalUn / "Model Sparsity Can Simplify Machine Unlearning" (Jia et al.,
  NeurIPS 2023, ``OPTML-Group/Unlearn-Sparse``) MIA-efficacy; the UA/RA/TA/MIA-efficacy/Avg. Gap
  table layout comes from there.
* :func:`loss_attack` -- the NeurIPS 2023 Machine Unlearning challenge starting kit's
  ``simple_mia``: logistic regression on per-example losses, cross-validated.

Every function takes host ``np.ndarray`` (or array-likes), never device arrays, so that
evaluation code decides once where device-to-host transfers happen.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping

import numpy as np

from camu_jax.results import GAP_KEYS

# sklearn and xgboost take ~2-3 s to import, so the attacks import them when called and
# `import camu_jax.metrics` (e.g. from reporting) stays cheap. The backend is fixed here: an
# installed but broken xgboost raises instead of silently switching to another attack.
MIA_BACKEND = (
    "xgboost" if importlib.util.find_spec("xgboost") is not None else "sklearn-gradient-boosting"
)

# `mia_efficacy` fits its RBF SVC on at most this many examples of each side (members,
# non-members): the SVC's cost grows with the square of its points (docs/methods.md).
MIA_EFFICACY_MAX_PER_SIDE = 2500

# The SalUn scores `unlearning_scores` returns: the keys of Avg. Gap (`results.GAP_KEYS`).
SCORE_KEYS = GAP_KEYS


def _as_2d(name: str, x) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape [n, classes], got {arr.shape}")
    return arr


def _as_1d(name: str, x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape [n], got {arr.shape}")
    return arr


def accuracy(*, logits_or_probs, labels, mask=None) -> float:
    """Top-1 accuracy in percent: ``100 * mean(argmax(logits_or_probs) == labels)``.

    Same as the reference ``train.test`` (``100.0 * correct / total``); ``mask`` plays the role
    of its ``output_label`` class filter (e.g. ``mask = labels != forget_class`` for "acc re ts").

    Args:
      logits_or_probs: ``[n, classes]`` logits or probabilities (argmax is the same for both).
      labels: ``[n]`` integer labels.
      mask: optional ``[n]`` boolean; only selected examples count.

    Returns:
      Accuracy in percent, or ``nan`` when no example is selected (e.g. the forgotten-class test
      accuracy under random removal), so that an undefined value is never mistaken for 0 %.
    """
    scores = _as_2d("logits_or_probs", logits_or_probs)
    labels = _as_1d("labels", labels)
    correct = scores.argmax(axis=1) == labels
    if mask is not None:
        correct = correct[_as_1d("mask", mask).astype(bool)]
    if correct.size == 0:
        return float("nan")
    return float(100.0 * correct.mean())


def softmax(*, logits) -> np.ndarray:
    """Row-wise softmax of ``[n, classes]`` logits, max-shifted (PyTorch ``F.softmax(dim=1)``);
    the MIA functions take probabilities, evaluation produces logits."""
    z = _as_2d("logits", logits)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def per_example_cross_entropy(*, probs_or_logits, labels, from_logits: bool | None = None):
    """Per-example cross-entropy ``-log softmax(z)[y]`` (PyTorch ``CrossEntropyLoss(reduction=
    "none")``, as the NeurIPS 2023 kit's ``compute_losses``).

    Args:
      probs_or_logits: ``[n, classes]``.
      labels: ``[n]`` integer labels.
      from_logits: ``True`` for logits, ``False`` for probabilities; ``None`` guesses
        probabilities when every row is non-negative and sums to 1 (to 1e-3).

    Returns:
      ``[n]`` float64 losses. Logits go through a max-shifted log-sum-exp; probabilities are
      clipped at 1e-12, because float32 softmax underflows to exact zeros (loss <= 27.6).
    """
    z = _as_2d("probs_or_logits", probs_or_logits)
    labels = _as_1d("labels", labels).astype(np.int64)
    if from_logits is None:
        from_logits = not (np.all(z >= 0) and np.allclose(z.sum(axis=1), 1.0, atol=1e-3))
    picked = z[np.arange(z.shape[0]), labels]
    if from_logits:
        m = z.max(axis=1)
        return m + np.log(np.exp(z - m[:, None]).sum(axis=1)) - picked
    return -np.log(np.clip(picked, 1e-12, None))


def _reference_mia_split(*, n_sample: int, n_test: int, n_forget: int, n_train: int):
    """Index plan of :func:`reference_mia`: (n_fit, test_eval_start, test_eval_stop)."""
    # The reference assumes |test| >= 4000 + |D_f| (MNIST class 0: 4000 + 5923 <= 10000). When
    # that fails, half of the test outputs train the attack and the other half evaluate it, so
    # attack-train and attack-eval non-members never overlap.
    n_test_fit = n_train if n_test >= n_train + n_forget else n_test // 2
    # Equal member/non-member counts, as the reference's ~4000 vs ~4000.
    n_fit = min(n_sample, n_test_fit)
    return n_fit, n_fit, min(n_test, n_fit + n_forget)


def reference_mia(
    *, sample_probs, test_probs, forget_probs, seed: int = 0, n_train: int = 4000
) -> float:
    """CaMU reference membership-inference attack accuracy, in percent.

    Source: ``CaMU/train.py`` (``train_attack_model`` then ``attack``), called from ``main.py``
    with the sample set D_s as members. Features are softmax outputs sorted ascending within each
    row. An ``XGBClassifier(n_estimators=100, objective="binary:logistic")`` (``MIA_BACKEND``;
    sklearn ``GradientBoostingClassifier(n_estimators=100)`` if xgboost is missing) is fit on the
    first ``n_fit`` D_s outputs (label 1) against the first ``n_fit`` test outputs (label 0),
    ``n_fit = min(n_train, |D_s|)``. It is evaluated on all of D_f (label 1) plus the next
    ``|D_f|`` test outputs (label 0), which the attack never saw.

    Small sets: when ``|test| < n_train + |D_f|`` (e.g. sklearn digits, 180 forget / 360 test)
    the first half of the test outputs is the attack-train pool and the second half the eval
    pool; then ``n_fit = min(|D_s|, |test| // 2)`` and the eval non-members are capped by that
    half, so the eval set can hold more members than non-members.

    Differences from the reference, all deliberate: the reference fits on a random 99 % of its
    ~8000 points (``train_test_split(test_size=0.01)``) and takes "about" 4000 per side from
    shuffled loaders; here slicing is exact and deterministic, and the attack is seeded. The
    reference logs a fraction (MNIST class 0: 0.2319); this returns percent (23.19). Lower means
    D_f looks less like training members.

    Args:
      sample_probs: ``[n_s, classes]`` softmax outputs on D_s (members seen by the attack).
      test_probs: ``[n_t, classes]`` softmax outputs on the test set, in a fixed order.
      forget_probs: ``[n_f, classes]`` softmax outputs on D_f.
      seed: attack model seed.
      n_train: per-side attack-train size (reference: 4000).
    """
    sample = np.sort(_as_2d("sample_probs", sample_probs), axis=1)
    test = np.sort(_as_2d("test_probs", test_probs), axis=1)
    forget = np.sort(_as_2d("forget_probs", forget_probs), axis=1)
    if not sample.shape[1] == test.shape[1] == forget.shape[1]:
        raise ValueError("sample_probs, test_probs and forget_probs need the same class count")
    n_fit, lo, hi = _reference_mia_split(
        n_sample=len(sample), n_test=len(test), n_forget=len(forget), n_train=n_train
    )
    if n_fit == 0 or len(forget) == 0:  # as `inapplicable_attacks`
        raise ValueError(
            f"reference_mia needs non-empty sets, got n_fit={n_fit}, n_forget={len(forget)}"
        )
    x_fit = np.concatenate([sample[:n_fit], test[:n_fit]])
    y_fit = np.concatenate([np.ones(n_fit), np.zeros(n_fit)]).astype(np.int64)
    x_eval = np.concatenate([forget, test[lo:hi]])
    y_eval = np.concatenate([np.ones(len(forget)), np.zeros(hi - lo)]).astype(np.int64)
    if MIA_BACKEND == "xgboost":
        from xgboost import XGBClassifier

        # One thread: the same trees whatever the host (models are scored in parallel
        # processes instead), and no oversubscription of the cores.
        attacker = XGBClassifier(
            n_estimators=100,
            objective="binary:logistic",
            booster="gbtree",
            random_state=seed,
            n_jobs=1,
        )
    else:  # pragma: no cover - xgboost is a declared dependency
        from sklearn.ensemble import GradientBoostingClassifier

        attacker = GradientBoostingClassifier(n_estimators=100, random_state=seed)
    attacker.fit(x_fit, y_fit)
    return float(100.0 * np.mean(attacker.predict(x_eval) == y_eval))


def _true_label_confidence(probs, labels, name: str) -> np.ndarray:
    p = _as_2d(name, probs)
    y = _as_1d(f"{name} labels", labels).astype(np.int64)
    return p[np.arange(len(p)), y][:, None]


def mia_efficacy(
    *,
    remain_probs,
    remain_labels,
    test_probs,
    test_labels,
    forget_probs,
    forget_labels,
    seed: int = 0,
    max_per_side: int | None = None,
) -> float:
    """SalUn / Unlearn-Sparse MIA-efficacy in percent: share of D_f the attack calls non-member.

    Source: ``OPTML-Group/Unlearn-Sparse`` ``evaluation/SVC_MIA.py`` (``SVC_MIA``, key
    ``"confidence"``) as called by ``main_forget.py`` for ``SVC_MIA_forget_efficacy`` (Jia et
    al. 2023, App. C.3; SalUn reports ``100 * confidence``). Feature: the softmax probability of
    the true label, ``[n, 1]``. Attack: ``sklearn.svm.SVC(C=3, gamma="auto", kernel="rbf")`` fit
    on remaining-train (label 1) vs test (label 0). Result: ``100 * (1 - mean(predict(D_f)))``.

    Balancing: the original takes the first ``|test|`` remaining examples; here a seeded random
    subset of ``n = min(|D_r|, |test|, max_per_side)`` remaining examples and of ``n`` test
    examples (the subsets are drawn as before the cap whenever ``n`` is below it: sklearn's
    digits, 360 per side, is scored as it always was). Higher means D_f looks less like
    training data; compare it with Retrain's value, not 100.
    Cost: the RBF SVC is quadratic: 10k + 10k points (MNIST, CIFAR-10 uncapped) took about 15 s
    a model on one CPU core and were most of an MNIST study's evaluation; the default cap of
    ``MIA_EFFICACY_MAX_PER_SIDE`` (2,500 + 2,500 points) fits in well under a second on its
    one feature, and bounds the cost whatever the data set (docs/methods.md, "MIA-efficacy").

    Args:
      remain_probs, remain_labels: ``[n_r, classes]``, ``[n_r]`` on D_r (members).
      test_probs, test_labels: ``[n_t, classes]``, ``[n_t]`` on the test set (non-members).
      forget_probs, forget_labels: ``[n_f, classes]``, ``[n_f]`` on D_f (attack targets).
      seed: seed of the balancing subsample.
      max_per_side: the most examples of each side the SVC is fitted on.
    """
    remain = _true_label_confidence(remain_probs, remain_labels, "remain_probs")
    test = _true_label_confidence(test_probs, test_labels, "test_probs")
    forget = _true_label_confidence(forget_probs, forget_labels, "forget_probs")
    cap = MIA_EFFICACY_MAX_PER_SIDE if max_per_side is None else max_per_side
    n = min(len(remain), len(test), cap)
    if n == 0 or len(forget) == 0:  # as `inapplicable_attacks`
        raise ValueError("mia_efficacy needs non-empty remain, test and forget sets")
    from sklearn.svm import SVC

    rng = np.random.default_rng(seed)
    remain = remain[np.sort(rng.permutation(len(remain))[:n])]
    test = test[np.sort(rng.permutation(len(test))[:n])]
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    clf.fit(np.concatenate([remain, test]), np.concatenate([np.ones(n), np.zeros(n)]))
    return float(100.0 * (1.0 - clf.predict(forget).mean()))


# StratifiedShuffleSplit holds out 10 % of 2n points, which must contain one point of each side.
LOSS_ATTACK_MIN_PER_SIDE = 10


def inapplicable_attacks(
    *, n_forget: int, n_sample: int, n_remain: int, n_test: int, n_train: int = 4000
) -> dict[str, str]:
    """Which attacks cannot run on sets of these sizes, each with the reason: the same rules the
    attacks enforce, known from the split sizes before any model is trained.

    Returns ``{attack name: reason}``; an attack not listed applies. Names are those of
    :func:`reference_mia`, :func:`mia_efficacy` and :func:`loss_attack`.
    """
    out = {}
    n_fit, _, _ = _reference_mia_split(
        n_sample=n_sample, n_test=n_test, n_forget=n_forget, n_train=n_train
    )
    if n_fit == 0 or n_forget == 0:
        out["reference_mia"] = (
            f"needs non-empty attack-train and forget sets, got n_fit={n_fit}, n_forget={n_forget}"
        )
    if min(n_remain, n_test) == 0 or n_forget == 0:
        out["mia_efficacy"] = "needs non-empty remain, test and forget sets"
    n = min(n_forget, n_test)
    if n < LOSS_ATTACK_MIN_PER_SIDE:
        out["loss_attack"] = (
            f"needs >= {LOSS_ATTACK_MIN_PER_SIDE} losses per side (forget and test), got {n}"
        )
    return out


def loss_attack(*, forget_losses, test_losses, n_splits: int = 10, seed: int = 0) -> float:
    """NeurIPS 2023 Machine Unlearning challenge kit ``simple_mia``: cross-validated accuracy.

    Source: ``unlearning-CIFAR10.ipynb`` of the challenge starting kit. Per-example losses,
    reshaped ``[n, 1]``; members = D_f losses (1), non-members = test losses (0); the larger set
    is subsampled (seeded, here; ``np.random.shuffle`` there) to the smaller's size. Attack:
    ``sklearn.linear_model.LogisticRegression()`` scored with
    ``model_selection.cross_val_score(cv=StratifiedShuffleSplit(n_splits, random_state=seed),
    scoring="accuracy")`` (default 10 % held out per split).

    Args:
      forget_losses: ``[n_f]`` per-example losses on D_f.
      test_losses: ``[n_t]`` per-example losses on the test set.

    Returns:
      Mean accuracy over the splits as a fraction in [0, 1]; 0.5 means indistinguishable.
    """
    forget = _as_1d("forget_losses", forget_losses).astype(np.float64)
    test = _as_1d("test_losses", test_losses).astype(np.float64)
    n = min(len(forget), len(test))
    if n < LOSS_ATTACK_MIN_PER_SIDE:
        raise ValueError(
            f"loss_attack needs >= {LOSS_ATTACK_MIN_PER_SIDE} losses per side, got {n}"
        )
    from sklearn import linear_model, model_selection

    rng = np.random.default_rng(seed)
    forget = rng.permutation(forget)[:n]
    test = rng.permutation(test)[:n]
    x = np.concatenate([test, forget]).reshape(-1, 1)
    y = np.array([0] * n + [1] * n)
    cv = model_selection.StratifiedShuffleSplit(n_splits=n_splits, random_state=seed)
    scores = model_selection.cross_val_score(
        linear_model.LogisticRegression(), x, y, cv=cv, scoring="accuracy"
    )
    return float(scores.mean())


def unlearning_scores(
    *, forget_acc: float, remain_acc: float, test_acc: float, mia_efficacy: float
) -> dict[str, float]:
    """SalUn table metrics: ``UA = 100 - acc(D_f)``, ``RA = acc(D_r)``, ``TA = acc(test)``,
    ``mia_efficacy`` (all percent), keyed as `SCORE_KEYS`."""
    return {
        "UA": 100.0 - float(forget_acc),
        "RA": float(remain_acc),
        "TA": float(test_acc),
        "mia_efficacy": float(mia_efficacy),
    }


def avg_gap(
    scores: Mapping[str, float],
    retrain_scores: Mapping[str, float],
    keys: Iterable[str] = SCORE_KEYS,
) -> float:
    """SalUn "Avg. Gap": ``mean_k |scores[k] - retrain_scores[k]|`` over ``keys``."""
    keys = tuple(keys)
    if not keys:
        raise ValueError("avg_gap needs at least one key")
    return float(np.mean([abs(float(scores[k]) - float(retrain_scores[k])) for k in keys]))


def add_gaps(methods: dict[str, dict], keys: Iterable[str] = GAP_KEYS):
    """Adds `avg_gap` (to `methods["retrain"]` over `keys`), `rte` (Retrain's run seconds / the
    method's: `run_seconds`, compiling apart, where both entries have them, else `seconds`) and
    `rte_with_compile` (the same of `seconds`, compiling included; where `run_seconds` are
    known) to every method's metrics of one run, in place; both None for `original`. A method
    without scores (`"diverged"` in its entry) gets `avg_gap` None."""
    keys = tuple(keys)
    retrain = methods["retrain"]
    for name, r in methods.items():
        r["avg_gap"] = None if "diverged" in r else avg_gap(r, retrain, keys=keys)
        split = "run_seconds" in r and "run_seconds" in retrain
        run_key = "run_seconds" if split else "seconds"
        r["rte"] = (
            None
            if name == "original"
            else rte(retrain_seconds=retrain[run_key], unlearn_seconds=r[run_key])
        )
        if split:
            r["rte_with_compile"] = (
                None
                if name == "original"
                else rte(retrain_seconds=retrain["seconds"], unlearn_seconds=r["seconds"])
            )
    return methods


def rte(*, retrain_seconds: float, unlearn_seconds: float) -> float:
    """Run-time efficiency as a speed-up: ``retrain_seconds / unlearn_seconds`` (> 1 = faster
    than retraining). SalUn reports RTE as minutes; this ratio is independent of the hardware."""
    for name, value in (("retrain_seconds", retrain_seconds), ("unlearn_seconds", unlearn_seconds)):
        if not value > 0:  # also rejects nan
            raise ValueError(f"{name} must be positive, got {value!r}")
    return float(retrain_seconds) / float(unlearn_seconds)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and population std (``np.std``, ddof=0), as the reference ``utils.write_results``."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(arr.mean()), float(arr.std())
