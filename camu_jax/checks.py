"""Checks that the library's entry points run on their arguments before any work starts.

Each raises ValueError naming the argument and the values that do not fit: splits made from
other labels than the data they are used with, labels outside the class range, a model with too
few logits. Without them these run anyway and come back as wrong numbers, or as a non-finite
loss that blames the learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flax import linen as nn

from camu_jax.data.pipeline import DeviceData
from camu_jax.data.splits import Splits


def check_items(items: Sequence[np.ndarray], data: DeviceData, *, name: str = "items") -> None:
    """Every `items[i]` indexes `data`'s rows: 1-D integers in 0..data.size-1."""
    for i, it in enumerate(items):
        _check_indices(np.asarray(it), data.size, f"{name}[{i}]")


def check_splits(
    splits: Sequence[Splits], data: DeviceData, *, name: str = "splits", data_name: str = "data"
) -> None:
    """Every `splits[i]` was made for `data`: D_f, D_r and the rows it holds out on purpose
    (`Splits.held_out`, usually none) split its rows exactly (each row in one of them), D_s
    lies in D_r."""
    n = data.size
    for i, sp in enumerate(splits):
        what = f"{name}[{i}]"
        if not isinstance(sp, Splits):
            raise ValueError(f"{what} is a {type(sp).__name__}, not a Splits")
        forget, remain, sample, held = (
            np.asarray(a) for a in (sp.forget, sp.remain, sp.sample, sp.held_out)
        )
        parts = (("forget", forget), ("remain", remain), ("sample", sample), ("held_out", held))
        for part, idx in parts:
            _check_indices(idx, n, f"{what}.{part}", data_name)
        if forget.size + remain.size + held.size != n:
            out = f" + {held.size} held out" if held.size else ""
            raise ValueError(
                f"{what} holds {forget.size} forget + {remain.size} remain{out} = "
                f"{forget.size + remain.size + held.size} items, but {data_name} has {n} rows: "
                "splits must be made from the labels of the data they are used with"
            )
        every = np.concatenate([forget, remain, held]).astype(np.int64)
        counts = np.bincount(every, minlength=n)
        if np.any(counts != 1):
            twice = np.flatnonzero(counts > 1)[:10].tolist()
            raise ValueError(
                f"{what}: rows {twice} of {data_name} are in two of forget, remain and held_out "
                "(or twice in one)"
            )
        outside = np.setdiff1d(sample, remain)
        if outside.size:
            raise ValueError(f"{what}.sample holds rows not in remain: {outside[:10].tolist()}")


def check_image_sizes(train: DeviceData, test: DeviceData) -> None:
    """`train` and `test` inputs have one shape per row (`[H, W, C]` images, `[D]` features,
    `[T, D]` sequences): one model scores both."""
    if tuple(train.images.shape[1:]) != tuple(test.images.shape[1:]):
        raise ValueError(
            f"train images of shape {tuple(train.images.shape)} and test images of shape "
            f"{tuple(test.images.shape)} differ in the shape of one input (all but the first "
            "axis): one model scores both"
        )


def check_labels(data: DeviceData, num_classes: int, *, name: str = "data") -> None:
    """`data`'s labels lie in 0..num_classes-1."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ValueError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    labels = data.host_labels
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{name} has labels outside 0..{num_classes - 1} (num_classes={num_classes}): "
            f"{labels[rows[:10]].tolist()} at rows {rows[:10].tolist()}"
        )


def check_model_classes(
    model: nn.Module, *datas: tuple[str, DeviceData], num_classes: int | None = None
) -> None:
    """`model` gives a logit for every label of each `(name, data)` and for `num_classes`."""
    if not datas:
        return
    logits = num_logits(model, datas[0][1].input_shape)
    if num_classes is not None and num_classes > logits:
        raise ValueError(
            f"the model gives {logits} logits per image but num_classes is {num_classes}"
        )
    for name, data in datas:
        if data.host_labels.size and int(data.host_labels.max()) >= logits:
            top = int(data.host_labels.max())
            raise ValueError(
                f"{name} has label {top} but the model gives only {logits} logits per image "
                f"(classes 0..{logits - 1})"
            )


def num_logits(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """How many logits `model` (linen or NNX) gives per input of `input_shape` (traced, not
    run)."""
    from camu_jax.models.calling import output_shapes

    return int(output_shapes(model, tuple(input_shape))[0][-1])


def _check_indices(idx: np.ndarray, n: int, what: str, data_name: str = "data") -> None:
    if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(
            f"{what} must be 1-D integer indices, got {idx.dtype} of shape {idx.shape}"
        )
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise ValueError(
            f"{what} holds indices outside {data_name}'s rows 0..{n - 1}: {bad[:10].tolist()}"
        )
