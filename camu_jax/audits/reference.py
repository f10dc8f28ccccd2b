"""Plain numpy references of the audit metrics, transliterated from the official code, one
example (and one target model) at a time: what `camu_jax.audits.metrics` computes on device is
checked against these (`tests/test_audit_metrics.py`).

* `logit_scaled_confidence`: `google-deepmind/unlearning_evaluation` `metric.py:
  compute_logit_scaled_confidence` (itself `tensorflow/privacy`
  `research/mi_lira_2021/score.py: load_one`).
* `lira_scores`, `sweep`: `tensorflow/privacy` `research/mi_lira_2021/plot.py`
  (`generate_ours`, `sweep`, `do_plot`), with the U-LiRA sets of Hayes et al. (2024).
* `binned_kl`, `klom`: `RoyRin/data-unlearning-bench` `src/eval.py`
  (`compute_binned_KL_div`, `kl_from_margins`).
* `epsilons`, `forget_score`: `google-deepmind/unlearning_evaluation` `metric.py`
  (`_get_double_threshold_rates`, `_get_single_threshold_rates`, `_get_epsilons`,
  `compute_forget_score_from_confs`), torch replaced by numpy.

Deliberate differences, each also in the device version: the epsilon rates and the
single-threshold grid are float64 (the official rates are float32 means, and its
`torch.linspace` of two 0-d tensors returns float32 thresholds: a threshold moves by < 1e-6,
which changes a rate only where a confidence lies that close to it); an example whose
thresholds all give NaN is NaN (the official code asserts).
"""

from __future__ import annotations

import numpy as np

DELTA = 1e-5
EPSILON_CAP = 50.0
NUM_THRESHOLDS_PER_UNIT = 100


def logit_scaled_confidence(logits, labels) -> np.ndarray:
    """`[n]` log p_y - log(1 - p_y) from float64 softmax probabilities, floored at 1e-45."""
    logits = np.array(logits, np.float64)
    labels = np.asarray(labels)
    count = logits.shape[0]
    logits -= np.max(logits, axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= np.sum(probs, axis=1, keepdims=True)
    prob_correct = probs[np.arange(count), labels].copy()
    probs[np.arange(count), labels] = 0
    prob_wrong = np.sum(probs, axis=1)
    return np.log(prob_correct + 1e-45) - np.log(prob_wrong + 1e-45)


# -------------------------------------------------------------------------------- LiRA


def lira_scores(phi, *, member, nonmember, valid=None, variance="global") -> np.ndarray:
    """`[models, examples]` likelihood-ratio scores log N(phi; IN) - log N(phi; OUT) (larger:
    more likely IN), NaN where model t is no target of example x or a side has too few fit
    models.

    For target model t the Gaussians of example x are fitted to the phi of every other valid
    model: IN where `member` (U-LiRA: trained on x, then unlearned it), OUT where `nonmember`
    (never trained on x); the centre is the median (`generate_ours`), the spread the std of
    the fit models (`variance="per_example"`, needs 2 per side) or one std shared by every
    example and both sides (`"global"`, `fix_variance=True`: `np.std` of every valid IN
    value). The official code negates this (`pr_in - pr_out`) and sweeps `-score`."""
    from scipy.stats import norm

    phi = np.asarray(phi, np.float64)
    member, nonmember = np.asarray(member, bool), np.asarray(nonmember, bool)
    models, examples = phi.shape
    valid = np.ones(models, bool) if valid is None else np.asarray(valid, bool)
    sigma = np.std(phi[member & valid[:, None]]) if variance == "global" else None
    need = 1 if variance == "global" else 2
    out = np.full((models, examples), np.nan)
    for t in range(models):
        if not valid[t]:
            continue
        fit = valid.copy()
        fit[t] = False
        for x in range(examples):
            if not (member[t, x] or nonmember[t, x]):
                continue
            dat_in = phi[fit & member[:, x], x]
            dat_out = phi[fit & nonmember[:, x], x]
            if len(dat_in) < need or len(dat_out) < need:
                continue
            mean_in, mean_out = np.median(dat_in), np.median(dat_out)
            if sigma is None:
                std_in, std_out = np.std(dat_in), np.std(dat_out)
            else:
                std_in = std_out = sigma
            pr_in = -norm.logpdf(phi[t, x], mean_in, std_in + 1e-30)
            pr_out = -norm.logpdf(phi[t, x], mean_out, std_out + 1e-30)
            out[t, x] = -(pr_in - pr_out)
    return out


def sweep(score, answers) -> tuple[np.ndarray, np.ndarray, float, float]:
    """`plot.py: sweep` on scores where larger means member: fpr, tpr, AUC, and the best
    balanced accuracy over thresholds."""
    from sklearn.metrics import auc, roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(answers, bool), np.asarray(score))
    acc = np.max(1 - (fpr + (1 - tpr)) / 2)
    return fpr, tpr, float(auc(fpr, tpr)), float(acc)


def tpr_at_fpr(fpr, tpr, level: float) -> float:
    """`do_plot`'s low-FPR figure: the TPR of the last ROC point with FPR below `level`."""
    return float(tpr[np.where(fpr < level)[0][-1]])


# -------------------------------------------------------------------------------- KLOM


def binned_kl(p_arr, q_arr, bin_count=20, eps=1e-5, min_val=-100, max_val=100) -> float:
    """`compute_binned_KL_div`: KL(p || q) of the two samples' histograms on `bin_count`
    equal bins over their joint (clipped) range; q floored at `eps` where p > 0. As there, a
    sample equal to the joint maximum falls past the last bin (`np.digitize`) and is not
    counted; an empty p histogram gives NaN."""
    p_arr = np.clip(p_arr, min_val, max_val)
    q_arr = np.clip(q_arr, min_val, max_val)
    bins_start = min(p_arr.min(), q_arr.min())
    bins_end = max(p_arr.max(), q_arr.max())
    if bins_start >= bins_end:
        bins_end = bins_start + 1
    bins = np.linspace(bins_start, bins_end, bin_count + 1)
    p_idx = np.digitize(p_arr, bins)
    q_idx = np.digitize(q_arr, bins)
    p_counts = np.array([np.sum(p_idx == i) for i in range(1, bin_count + 1)])
    q_counts = np.array([np.sum(q_idx == i) for i in range(1, bin_count + 1)])
    p_total, q_total = p_counts.sum(), q_counts.sum()
    p_probs = p_counts / p_total if p_total > 0 else np.zeros_like(p_counts, dtype=float)
    q_probs = q_counts / q_total if q_total > 0 else np.zeros_like(q_counts, dtype=float)
    q_safe = np.where(p_probs > 0, np.maximum(q_probs, eps), q_probs)
    from scipy.stats import entropy

    with np.errstate(invalid="ignore", divide="ignore"):
        return float(entropy(pk=p_probs, qk=q_safe))


def klom(unlearned, oracle) -> np.ndarray:
    """`kl_from_margins`: `[examples]` KL(unlearned || oracle) of margins `[models, examples]`
    (the two model counts may differ)."""
    unlearned, oracle = np.asarray(unlearned, np.float64), np.asarray(oracle, np.float64)
    return np.array([binned_kl(unlearned[:, i], oracle[:, i]) for i in range(oracle.shape[1])])


# ----------------------------------------------------------------------- epsilon (NeurIPS 2023)


def _rates(pp_pos: np.ndarray, pp_neg: np.ndarray):
    """tpr, fnr, fpr, tnr of predicted positives `[models, thresholds]` (means over models)."""
    return pp_pos.mean(0), (~pp_pos).mean(0), pp_neg.mean(0), (~pp_neg).mean(0)


def _double_threshold_rates(pos, neg):
    pos_diff = pos.max() - pos.min()
    neg_diff = neg.max() - neg.min()
    smallest = neg_diff if pos_diff > neg_diff else pos_diff
    if pos_diff >= neg_diff:  # "positive" is the peakier distribution
        pos, neg = neg, pos
    buffer = 2.0
    width = smallest
    min_ = pos.min() + width - buffer
    max_ = pos.max() + buffer
    num_right = int(np.ceil((max_ - min_) * NUM_THRESHOLDS_PER_UNIT))
    right = np.linspace(min_, max_, num=num_right)
    num_left = int(np.ceil(2 * buffer * NUM_THRESHOLDS_PER_UNIT))
    left = np.concatenate(
        [np.linspace(tr - width - buffer, tr - width + buffer, num=num_left) for tr in right]
    )
    right = np.repeat(right, num_left)

    def is_pp(c):
        return (left[None, :] <= c[:, None]) & (c[:, None] <= right[None, :])

    return _rates(is_pp(pos), is_pp(neg))


def _single_threshold_rates(pos, neg):
    both = np.concatenate([pos, neg])
    num = int(np.ceil((both.max() - both.min()) * NUM_THRESHOLDS_PER_UNIT))
    thresholds = np.linspace(both.min(), both.max(), num)
    return _rates(pos[:, None] >= thresholds[None, :], neg[:, None] >= thresholds[None, :])


def epsilons(pos_confs, neg_confs, delta: float = DELTA) -> np.ndarray:
    """`_get_epsilons`: per example (column), the largest epsilon at `delta` over the
    double- and single-threshold attacks between two `[models, examples]` samples, capped at
    `EPSILON_CAP`; the cap outright where one sample's range is below 1 % of the other's."""
    pos_confs, neg_confs = np.asarray(pos_confs, np.float64), np.asarray(neg_confs, np.float64)
    out = []
    for i in range(pos_confs.shape[1]):
        pos, neg = pos_confs[:, i], neg_confs[:, i]
        pos_diff, neg_diff = np.max(pos) - np.min(pos), np.max(neg) - np.min(neg)
        largest = pos_diff if pos_diff > neg_diff else neg_diff
        smallest = neg_diff if pos_diff > neg_diff else pos_diff
        with np.errstate(invalid="ignore", divide="ignore"):
            if smallest / largest < 0.01:
                out.append(EPSILON_CAP)
                continue
        rates = [
            np.concatenate(pair)
            for pair in zip(
                _double_threshold_rates(pos, neg), _single_threshold_rates(pos, neg), strict=True
            )
        ]
        tpr, fnr, fpr, tnr = rates
        thr_eps = np.zeros(len(tpr))
        thr_eps[(fpr + fnr == 0) & (tpr + tnr == 2)] = np.inf
        thr_eps[(thr_eps == 0) & (fpr * fnr == 0)] = np.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.clip(
                np.fmax(
                    np.log(1 - delta - fpr) - np.log(fnr), np.log(1 - delta - fnr) - np.log(fpr)
                ),
                0,
                None,
            )
        thr_eps = np.where(thr_eps == 0, value, thr_eps)
        kept = thr_eps[~np.isnan(thr_eps)]
        out.append(np.max(kept) if kept.size else np.nan)
    return np.clip(np.array(out, np.float64), 0, EPSILON_CAP)


def forget_score(unlearned_confs, retrained_confs) -> tuple[float, np.ndarray]:
    """`compute_forget_score_from_confs`: the bucketed forgetting score F of `[models,
    forget examples]` confidences, and the per-example epsilons. Per example the positive
    sample is the one with the larger median; epsilon in [0, 0.5) earns 1 point, [0.5, 1) a
    half, ... up to ceil(log(N - 1)) (N unlearned models), beyond it none; F is the mean."""
    unlearned_confs = np.asarray(unlearned_confs, np.float64)
    retrained_confs = np.asarray(retrained_confs, np.float64)
    size = retrained_confs.shape[1]
    positive = np.median(retrained_confs, axis=0) > np.median(unlearned_confs, axis=0)
    eps = np.empty(size)
    for i in range(size):
        r, u = retrained_confs[:, i : i + 1], unlearned_confs[:, i : i + 1]
        eps[i] = epsilons(r, u)[0] if positive[i] else epsilons(u, r)[0]
    max_epsilon = np.ceil(np.log(unlearned_confs.shape[0] - 1))
    start, bucket, points, buckets = 0.0, 0.5, 1.0, {}
    while start + bucket <= max_epsilon:
        buckets[start] = points
        points /= 2
        start += bucket
    score = 0.0
    for e in eps:
        for lo, pts in buckets.items():
            if e < lo + bucket:
                score += pts
                break
    return score / size, eps
