"""Evaluating a model: batched eval-mode predictions and the reference's five accuracies.

Attack-style metrics (membership inference, gaps to the retrained model) live in
`camu_jax.metrics`, which works on the host arrays produced here.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from camu_jax import sharding
from camu_jax.data.pipeline import InputSpec, pad_to_batches, preprocess
from camu_jax.data.splits import Splits
from camu_jax.steps import apply_model


@functools.lru_cache(maxsize=16)
def _logits_fn(model: nn.Module, spec: InputSpec):
    @jax.jit
    def run(variables, images, rows, ids):
        x = preprocess(images[rows[ids]], spec)
        logits, _, _ = apply_model(
            model, variables["params"], variables["batch_stats"], x, train=False
        )
        return logits

    return run


def predict_logits(
    model: nn.Module,
    variables: dict,
    images: jax.Array,
    *,
    spec: InputSpec,
    mesh: Mesh,
    rows: np.ndarray | None = None,
    batch_size: int = 1024,
    name: str = "the model",
) -> np.ndarray:
    """Eval-mode logits `[n, classes]` for `images[rows]` (default: every image).

    `images` is `[N, H, W, C]` on device (uint8, or floats already scaled: see
    `preprocess`); batches are padded to `batch_size`, so one compile serves every call with
    the same images. Raises FloatingPointError, naming `name`, when a logit is NaN or inf: no
    metric means anything then, and finite but huge parameters (a learning rate far too high)
    show up only here.
    """
    run = _logits_fn(model, spec)
    rows = np.arange(images.shape[0]) if rows is None else np.asarray(rows)
    n = rows.shape[0]
    bs = max(batch_size - batch_size % mesh.devices.size, mesh.devices.size)
    ids, _ = pad_to_batches(np.arange(n, dtype=np.int32), bs)
    table = np.zeros(ids.size, np.int32)
    table[:n] = rows
    table = sharding.replicate(table, mesh)
    out = [np.asarray(run(variables, images, table, sharding.shard_batch(i, mesh))) for i in ids]
    logits = np.concatenate(out)[:n]
    bad = ~np.isfinite(logits).all(axis=-1)
    if bad.any():
        leaves = [np.asarray(x) for x in jax.tree.leaves(variables) if np.size(x)]
        largest = max(float(np.abs(x).max()) for x in leaves)
        raise FloatingPointError(
            f"{name} gives non-finite logits on {int(bad.sum())} of {n} images (first: row "
            f"{int(rows[np.argmax(bad)])}); its largest |parameter| is {largest:.3g} (a "
            "learning rate far too high?)"
        )
    return logits


def _acc(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(100.0 * np.mean(pred == labels)) if labels.size else float("nan")


def reference_accuracies(
    *,
    train_logits: np.ndarray,
    train_labels: np.ndarray,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    splits: Splits,
    forget_classes: tuple[int, ...] | None,
) -> dict[str, float]:
    """The reference's five accuracies, in percent.

    remain_train_acc (D_r), forget_train_acc (D_f), test_acc (all test), test_remain_acc and
    test_forget_acc (test items outside / inside the forgotten classes; for random removal,
    where no class is forgotten, both are the plain test accuracy's complement and NaN).
    """
    train_pred = train_logits.argmax(-1)
    test_pred = test_logits.argmax(-1)
    out = {
        "remain_train_acc": _acc(train_pred[splits.remain], train_labels[splits.remain]),
        "forget_train_acc": _acc(train_pred[splits.forget], train_labels[splits.forget]),
        "test_acc": _acc(test_pred, test_labels),
    }
    if forget_classes:
        in_forget = np.isin(test_labels, forget_classes)
        out["test_remain_acc"] = _acc(test_pred[~in_forget], test_labels[~in_forget])
        out["test_forget_acc"] = _acc(test_pred[in_forget], test_labels[in_forget])
    else:
        out["test_remain_acc"] = out["test_acc"]
        out["test_forget_acc"] = float("nan")
    return out
