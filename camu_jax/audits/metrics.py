"""The audit metrics on device: U-LiRA scores, KLOM and the NeurIPS 2023 challenge's epsilons,
over `[models, examples]` phi, vectorised over models, examples and thresholds, in float64.

Each equals its numpy reference in `camu_jax.audits.reference` (the official code, one example
at a time; `tests/test_audit_metrics.py`) up to float64 rounding: the comparisons, sorts,
medians and counts are exact, and what differs is the order of a few sums and XLA's division
and logarithm (XLA:CPU's float64 division is not always correctly rounded, and it contracts
a multiply and an add into one rounding). Grids whose exact values decide a comparison (KLOM's
bin edges, the epsilon thresholds) are therefore built on the host with numpy's own
`linspace` arithmetic and only compared on device.

Host summaries: `attack_summary` (ROC, AUC, accuracies, TPR at low FPR of pooled scores, with
the band chance leaves), `percentiles`, `forget_score`, `final_score`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from camu_jax.audits.reference import DELTA, EPSILON_CAP, NUM_THRESHOLDS_PER_UNIT

# log(sqrt(2 pi)), as scipy.stats.norm's `_norm_pdf_logC`.
_LOG_C = math.log(math.sqrt(2 * math.pi))
# Two-sided 99 % quantile of the standard normal (scipy.stats.norm.ppf(0.995)).
Z99 = 2.5758293035489004
LEFT_THRESHOLDS = int(np.ceil(2 * 2.0 * NUM_THRESHOLDS_PER_UNIT))  # `buffer` 2 on each side


def _tqdm(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def _chunks(count: int, size: int):
    return [(lo, min(lo + size, count)) for lo in range(0, count, size)]


def _pad_columns(x: np.ndarray, width: int, value) -> np.ndarray:
    out = np.full((*x.shape[:-1], width), value, x.dtype)
    out[..., : x.shape[-1]] = x
    return out


# ------------------------------------------------------------------------------------ LiRA


def _loo_median(phi, mask):
    """`[targets, C]`: per target model t and column, the median of phi over the models in
    `mask` other than t (NaN-free; positions of an empty set are garbage, masked by the
    caller), from one sort per column: removing t's element shifts the positions past it."""
    models = phi.shape[0]
    key = jnp.where(mask, phi, jnp.inf)
    order = jnp.argsort(key, axis=0, stable=True)
    ordered = jnp.take_along_axis(key, order, axis=0)
    rank = jnp.argsort(order, axis=0)  # each model's position in its column's order
    k = mask.sum(0)[None, :] - mask  # the set's size without t
    own = mask

    def at(j):
        j = jnp.where(own & (j >= rank), j + 1, j)
        return jnp.take_along_axis(ordered, jnp.clip(j, 0, models - 1), axis=0)

    return (at((k - 1) // 2) + at(k // 2)) / 2, k


def _loo_std(phi, mask):
    """`[targets, C]`: np.std (ddof 0, two-pass) of phi over `mask` without target t."""
    models = phi.shape[0]
    fit = mask[None, :, :] & ~jnp.eye(models, dtype=bool)[:, :, None]  # [t, i, C]
    k = fit.sum(1)
    mean = jnp.where(fit, phi[None], 0).sum(1) / k
    return jnp.sqrt(jnp.where(fit, (phi[None] - mean[:, None]) ** 2, 0).sum(1) / k)


def _logpdf(x, loc, scale):
    return -(((x - loc) / scale) ** 2) / 2.0 - _LOG_C - jnp.log(scale)


@functools.partial(jax.jit, static_argnames=("per_example",))
def _lira_chunk(phi, inm, outm, sigma, per_example: bool):
    med_in, k_in = _loo_median(phi, inm)
    med_out, k_out = _loo_median(phi, outm)
    if per_example:
        sd_in, sd_out, need = _loo_std(phi, inm), _loo_std(phi, outm), 2
    else:
        sd_in = sd_out = sigma
        need = 1
    score = _logpdf(phi, med_in, sd_in + 1e-30) - _logpdf(phi, med_out, sd_out + 1e-30)
    ok = (inm | outm) & (k_in >= need) & (k_out >= need)
    return jnp.where(ok, score, jnp.nan)


def lira_variance(member, nonmember, valid, variance: str = "auto") -> str:
    """ "per_example" or "global": what "auto" picks (Carlini et al.: per-example variances
    from 64 shadow models on, i.e. 32 per side) — per example only where every example has
    at least 32 valid models on each side."""
    if variance != "auto":
        return variance
    v = np.asarray(valid, bool)[:, None]
    fewest = min((member & v).sum(0).min(), (nonmember & v).sum(0).min())
    return "per_example" if fewest >= 32 else "global"


def lira_scores(
    phi, *, member, nonmember, valid=None, variance: str = "global", progress: bool = False
) -> np.ndarray:
    """U-LiRA (or LiRA) scores `[models, examples]`, float64: log N(phi; IN) - log N(phi; OUT)
    per target model t and example x, the Gaussians fitted to the other valid models (t held
    out of its own fit); NaN where t is no target of x or a side has too few fit models.
    `member` `[models, examples]`: the model trained on the example and then unlearned it
    (plain LiRA: trained on it); `nonmember`: never trained on it. `variance`: "global" (one
    std, of every valid IN value, shared by both sides) or "per_example" (`reference.
    lira_scores`, which this equals)."""
    if variance not in ("global", "per_example"):
        raise ValueError(f"variance must be 'global' or 'per_example', got {variance!r}")
    phi = np.asarray(phi, np.float64)
    models, examples = phi.shape
    valid = np.ones(models, bool) if valid is None else np.asarray(valid, bool)
    inm = np.asarray(member, bool) & valid[:, None]
    outm = np.asarray(nonmember, bool) & valid[:, None]
    per_example = variance == "per_example"
    sigma = np.std(phi[inm]) if inm.any() else np.nan
    # Per-example variances hold [models, models, chunk] arrays: bound them (~32 MiB).
    width = 1024 if not per_example else int(np.clip(2**22 // models**2, 8, 1024))
    phi = np.where(valid[:, None], phi, 0.0)
    out = np.empty((models, examples))
    with jax.enable_x64(True), _tqdm(examples, "U-LiRA scores", progress) as bar:
        for lo, hi in _chunks(examples, width):
            part = [
                _pad_columns(a[:, lo:hi], width, f) for a, f in ((phi, 0.0), (inm, 0), (outm, 0))
            ]
            s = _lira_chunk(*part, np.float64(sigma), per_example)
            out[:, lo:hi] = np.asarray(s)[:, : hi - lo]
            bar.update(hi - lo)
    return out


def attack_summary(scores, *, member, nonmember, levels=(0.01, 0.001)) -> dict:
    """The attack's figures on pooled scores (every target model x example): positives where
    `member`, negatives where `nonmember`, NaN scores left out.

    accuracy: balanced accuracy of the likelihood-ratio test itself (positive where the score
    is > 0, i.e. IN likelier), no threshold fitted, so under no signal it is 0.5 within the
    binomial band `accuracy_band` (99 %, +-Z99 * sqrt(1/n_pos + 1/n_neg) / 4); best_accuracy:
    `plot.py: sweep`'s max over thresholds (optimistic by construction); auc (its 99 % band
    under no signal, Mann-Whitney: +-Z99 * sqrt((n_pos + n_neg + 1) / (12 n_pos n_neg)));
    `tpr_at_fpr`: `do_plot`'s TPR of the last ROC point with FPR below each level; `roc`: the
    curve's TPR at log-spaced FPRs (plots)."""
    from sklearn.metrics import auc, roc_curve

    scores = np.asarray(scores, np.float64)
    ok = np.isfinite(scores)
    pos = scores[np.asarray(member, bool) & ok]
    neg = scores[np.asarray(nonmember, bool) & ok]
    out = {"n_positive": int(pos.size), "n_negative": int(neg.size)}
    if not (pos.size and neg.size):
        keys = ("accuracy", "accuracy_band", "best_accuracy", "auc", "auc_band", "tpr_at_fpr")
        return {**out, **dict.fromkeys(keys), "roc": None}
    y = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
    fpr, tpr, _ = roc_curve(y, np.concatenate([pos, neg]))
    grid = np.logspace(-5, 0, 101)
    return {
        **out,
        "accuracy": float(((pos > 0).mean() + (neg <= 0).mean()) / 2),
        "accuracy_band": float(Z99 * np.sqrt(1 / pos.size + 1 / neg.size) / 4),
        "best_accuracy": float(np.max(1 - (fpr + (1 - tpr)) / 2)),
        "auc": float(auc(fpr, tpr)),
        "auc_band": float(Z99 * np.sqrt((pos.size + neg.size + 1) / (12 * pos.size * neg.size))),
        "tpr_at_fpr": {str(v): float(tpr[np.where(fpr < v)[0][-1]]) for v in levels},
        "roc": {
            "fpr": grid.tolist(),
            "tpr": tpr[np.searchsorted(fpr, grid, side="right") - 1].tolist(),
        },
    }


# ------------------------------------------------------------------------------------ KLOM


def _bin_edges(p: np.ndarray, q: np.ndarray, bins: int) -> np.ndarray:
    """`[examples, bins + 1]`: `np.linspace` over each column's joint range, numpy's own
    arithmetic (`arange * step + start`, the last edge the end itself)."""
    start = np.minimum(p.min(0), q.min(0))
    end = np.maximum(p.max(0), q.max(0))
    end = np.where(start >= end, start + 1, end)
    step = (end - start) / bins
    edges = np.arange(bins + 1, dtype=np.float64)[None, :] * step[:, None] + start[:, None]
    edges[:, -1] = end
    return edges


@functools.partial(jax.jit, static_argnames=("bins",))
def _klom_chunk(p, q, edges, floor, bins: int):
    def counts(x):  # np.digitize(x, edges) in 1..bins; a value at the last edge is past it
        idx = (edges[None, :, :] <= x[:, :, None]).sum(-1)
        return (idx[None] == jnp.arange(1, bins + 1)[:, None, None]).sum(1)  # [bins, C]

    cp, cq = counts(p), counts(q)
    tp, tq = cp.sum(0), cq.sum(0)
    p_probs = jnp.where(tp > 0, cp / jnp.maximum(tp, 1), 0.0)
    q_probs = jnp.where(tq > 0, cq / jnp.maximum(tq, 1), 0.0)
    q_safe = jnp.where(cp > 0, jnp.maximum(q_probs, floor), q_probs)
    pk = p_probs / p_probs.sum(0)  # scipy.stats.entropy normalises both again
    qk = q_safe / q_safe.sum(0)
    terms = jnp.where(cp > 0, pk * jnp.log(jnp.where(cp > 0, pk / qk, 1.0)), 0.0)
    return jnp.where(tp > 0, terms.sum(0), jnp.nan)


def klom(
    unlearned,
    oracle,
    *,
    bins: int = 20,
    clip: float = 100.0,
    floor: float = 1e-5,
    progress: bool = False,
) -> np.ndarray:
    """KLOM `[examples]`: per example, KL(unlearned || oracle) of the two models' margin
    samples `[models, examples]` (counts may differ) binned into `bins` equal bins over their
    joint range after clipping to +-`clip`, the oracle's probabilities floored at `floor`
    where the unlearned models have mass (`reference.klom`, which this equals; NaN where no
    unlearned margin lands in a bin, as there)."""
    p = np.clip(np.asarray(unlearned, np.float64), -clip, clip)
    q = np.clip(np.asarray(oracle, np.float64), -clip, clip)
    examples = p.shape[1]
    edges = _bin_edges(p, q, bins)
    # A chunk compares [models, width, bins + 1] values: bound it (~8M per side).
    width = int(np.clip(2**23 // (max(p.shape[0], q.shape[0]) * (bins + 1)), 16, 2048))
    out = np.empty(examples)
    with jax.enable_x64(True), _tqdm(examples, "KLOM", progress) as bar:
        for lo, hi in _chunks(examples, width):
            part = [_pad_columns(a[:, lo:hi], width, 0.0) for a in (p, q)]
            e = np.zeros((width, bins + 1))
            e[:, -1] = 1.0  # padding columns: any valid range
            e[: hi - lo] = edges[lo:hi]
            kl = _klom_chunk(*part, e, np.float64(floor), bins)
            out[lo:hi] = np.asarray(kl)[: hi - lo]
            bar.update(hi - lo)
    return out


def percentiles(values, groups: dict[str, np.ndarray], qs=(50, 95)) -> dict:
    """`{group: {"p50": .., "p95": .., "n": .., "undefined": ..}}` of per-example `values`
    over each group's example indices (NaN values left out and counted)."""
    values = np.asarray(values, np.float64)
    out = {}
    for name, idx in groups.items():
        v = values[np.asarray(idx)]
        good = v[np.isfinite(v)]
        entry = {f"p{q}": (float(np.percentile(good, q)) if good.size else None) for q in qs}
        out[name] = {**entry, "n": int(v.size), "undefined": int(v.size - good.size)}
    return out


# -------------------------------------------------------------------- epsilon (NeurIPS 2023)


def _linspace_rows(start, stop, num, width) -> tuple[np.ndarray, np.ndarray]:
    """`[rows, width]` `np.linspace(start[r], stop[r], num[r])` padded to `width`, with numpy's
    arithmetic, and its validity mask."""
    num = np.asarray(num)
    j = np.arange(width, dtype=np.float64)[None, :]
    div = np.maximum(num - 1, 1)[:, None]
    step = np.where(num[:, None] > 1, (stop - start)[:, None] / div, 0.0)
    y = j * step + start[:, None]
    last = np.maximum(num - 1, 0)
    rows = np.arange(len(num))
    y[rows, last] = np.where(num > 1, stop, y[rows, last])
    return y, j < num[:, None]


@jax.jit
def _epsilon_chunk(r, u, pos_is_r, p2_is_r, right, right_ok, left, single, single_ok, cap):
    """Per example (leading axis): epsilon of the double- and single-threshold attacks, from
    exact counts on the host-built grids."""
    n_r, n_u = r.shape[-1], u.shape[-1]

    def one(r, u, pos_is_r, p2_is_r, right, right_ok, left, single, single_ok, cap):
        def inside(v):  # models with left <= phi <= right, per threshold pair
            hi = jnp.searchsorted(v, right, side="right")[:, None]
            lo = jnp.searchsorted(v, left, side="left")
            return jnp.maximum(hi - lo, 0).reshape(-1)

        c_r, c_u = inside(r), inside(u)
        n_p2, n_n2 = jnp.where(p2_is_r, n_r, n_u), jnp.where(p2_is_r, n_u, n_r)
        tp_d, fp_d = jnp.where(p2_is_r, c_r, c_u), jnp.where(p2_is_r, c_u, c_r)
        ge_r = n_r - jnp.searchsorted(r, single, side="left")
        ge_u = n_u - jnp.searchsorted(u, single, side="left")
        n_pos, n_neg = jnp.where(pos_is_r, n_r, n_u), jnp.where(pos_is_r, n_u, n_r)
        tp_s, fp_s = jnp.where(pos_is_r, ge_r, ge_u), jnp.where(pos_is_r, ge_u, ge_r)
        tp = jnp.concatenate([tp_d, tp_s])
        fp = jnp.concatenate([fp_d, fp_s])
        n_p = jnp.concatenate(
            [jnp.broadcast_to(n_p2, tp_d.shape), jnp.broadcast_to(n_pos, tp_s.shape)]
        )
        n_n = jnp.concatenate(
            [jnp.broadcast_to(n_n2, tp_d.shape), jnp.broadcast_to(n_neg, tp_s.shape)]
        )
        ok = jnp.concatenate([jnp.repeat(right_ok, left.shape[-1]), single_ok])
        fn = n_p - tp
        # Counts are int32 (searchsorted): rates in float64, whatever the integer width.
        f64 = jnp.float64
        fpr, fnr = fp.astype(f64) / n_n.astype(f64), fn.astype(f64) / n_p.astype(f64)
        keep = 1.0 - DELTA
        value = jnp.fmax(jnp.log(keep - fpr) - jnp.log(fnr), jnp.log(keep - fnr) - jnp.log(fpr))
        value = jnp.maximum(value, 0.0)
        perfect = (fp == 0) & (fn == 0)  # fpr = fnr = 0 and tpr = tnr = 1
        eps = jnp.where(perfect, jnp.inf, jnp.where((fp == 0) | (fn == 0), jnp.nan, value))
        best = jnp.nanmax(jnp.where(ok, eps, jnp.nan))
        return jnp.where(cap, EPSILON_CAP, best)

    eps = jax.vmap(one)(r, u, pos_is_r, p2_is_r, right, right_ok, left, single, single_ok, cap)
    return jnp.clip(eps, 0.0, EPSILON_CAP)


def epsilons(unlearned, retrained, *, chunk: int = 8, progress: bool = False) -> np.ndarray:
    """Per example `[examples]`: the NeurIPS 2023 challenge's epsilon (delta 1e-5, capped at
    50) between the unlearned and the retrained models' phi `[models, examples]` (counts may
    differ): the positive sample is the one with the larger median; the largest epsilon over
    the interval attacks (two thresholds, interval width the peakier sample's range) and the
    single-threshold attacks, 100 thresholds per unit (`reference.forget_score`'s epsilons,
    which this equals)."""
    r = np.sort(np.asarray(retrained, np.float64), axis=0)
    u = np.sort(np.asarray(unlearned, np.float64), axis=0)
    examples = r.shape[1]
    pos_is_r = np.median(r, 0) > np.median(u, 0)
    d_r, d_u = r[-1] - r[0], u[-1] - u[0]
    pos_diff, neg_diff = np.where(pos_is_r, d_r, d_u), np.where(pos_is_r, d_u, d_r)
    largest = np.where(pos_diff > neg_diff, pos_diff, neg_diff)
    smallest = np.where(pos_diff > neg_diff, neg_diff, pos_diff)
    with np.errstate(invalid="ignore", divide="ignore"):
        cap = smallest / largest < 0.01
    # The interval attacks' "positive" is the peakier sample (swapped when pos_diff >= neg_diff).
    p2_is_r = np.where(pos_diff >= neg_diff, ~pos_is_r, pos_is_r)
    p2_min, p2_max = np.where(p2_is_r, r[0], u[0]), np.where(p2_is_r, r[-1], u[-1])
    d_min, d_max = p2_min + smallest - 2.0, p2_max + 2.0
    num_right = np.ceil((d_max - d_min) * NUM_THRESHOLDS_PER_UNIT).astype(np.int64)
    a_min, a_max = np.minimum(r[0], u[0]), np.maximum(r[-1], u[-1])
    num_single = np.ceil((a_max - a_min) * NUM_THRESHOLDS_PER_UNIT).astype(np.int64)
    # Static widths (one compile for all chunks): rounded up.
    width_r = -(-int(num_right.max(initial=1)) // 8) * 8
    width_s = -(-max(int(num_single.max(initial=1)), 1) // 512) * 512
    out = np.empty(examples)
    with jax.enable_x64(True), _tqdm(examples, "epsilon", progress) as bar:
        for lo, hi in _chunks(examples, chunk):
            idx = np.arange(lo, lo + chunk) % examples  # a short last chunk repeats columns
            right, right_ok = _linspace_rows(d_min[idx], d_max[idx], num_right[idx], width_r)
            tr = right - smallest[idx][:, None]
            start, stop = tr - 2.0, tr + 2.0
            k = np.arange(LEFT_THRESHOLDS, dtype=np.float64)
            left = k * ((stop - start) / (LEFT_THRESHOLDS - 1))[..., None] + start[..., None]
            left[..., -1] = stop
            single, single_ok = _linspace_rows(a_min[idx], a_max[idx], num_single[idx], width_s)
            eps = _epsilon_chunk(
                r[:, idx].T,
                u[:, idx].T,
                pos_is_r[idx],
                p2_is_r[idx],
                right,
                right_ok,
                left,
                single,
                single_ok & (num_single[idx] > 0)[:, None],
                cap[idx],
            )
            out[lo:hi] = np.asarray(eps)[: hi - lo]
            bar.update(hi - lo)
    return out


def forget_score(eps, *, models: int) -> float:
    """The challenge's bucketed forgetting score F of per-example epsilons: [0, 0.5) earns 1
    point, [0.5, 1) 1/2, [1, 1.5) 1/4, ... while a bucket ends by ceil(log(models - 1)) (what
    `models` models per side can resolve), beyond it (and NaN) none; F is the mean."""
    eps = np.asarray(eps, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        max_epsilon = np.ceil(np.log(models - 1)) if models > 1 else -np.inf
    buckets = int(2 * max_epsilon) if np.isfinite(max_epsilon) and max_epsilon > 0 else 0
    with np.errstate(invalid="ignore"):
        b = np.floor(2 * eps)
    points = np.where((b >= 0) & (b < buckets), 0.5 ** np.nan_to_num(b), 0.0)
    return float(points.sum() / eps.size)


def final_score(forget: float, *, ra_unlearned, ra_retrained, ta_unlearned, ta_retrained) -> float:
    """The challenge's final score: F x (RA_U / RA_R) x (TA_U / TA_R), accuracies averaged
    over each side's models."""
    return float(forget * (ra_unlearned / ra_retrained) * (ta_unlearned / ta_retrained))
