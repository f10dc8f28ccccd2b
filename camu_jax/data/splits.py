"""Forgetting, remaining and sample sets as pure functions of (labels, spec, seed).

All sets are numpy index arrays into the training split (sorted, source order), so a run can be
reproduced and audited from the saved indices alone.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

Kind = Literal["class", "random", "proportions", "indices"]


@dataclasses.dataclass(frozen=True)
class ForgetSpec:
    """What to forget.

    kind="class": every training item whose label is in `classes`.
    kind="random": a uniform random `fraction` (0 < fraction < 1) of the training set.
    kind="proportions": per class c a random `proportions[c]` share of its items (imbalanced
      removal, the reference's `class_data` with a proportion vector).
    kind="indices": exactly `indices`.
    repeat: how often D_f is repeated in the unlearning data (the reference repeats CIFAR-100's
      500-image class 10x); the default sample-set size is `repeat * |D_f|`.
    """

    kind: Kind = "class"
    classes: tuple[int, ...] = (0,)
    fraction: float = 0.1
    proportions: tuple[float, ...] = ()
    indices: tuple[int, ...] = ()
    repeat: int = 1


@dataclasses.dataclass(frozen=True)
class Splits:
    """`forget` (D_f), `remain` (D_r = the rest) and `sample` (D_s, subset of D_r), as sorted
    int64 indices into the training set; `repeat` as in `ForgetSpec`."""

    forget: np.ndarray
    remain: np.ndarray
    sample: np.ndarray
    repeat: int = 1
    # Rows deliberately in neither D_f nor D_r (a validation set held out of D_r, as
    # `experiments.tune` holds one): the library's checks then accept that forget + remain
    # do not cover the data (`camu_jax.checks.check_splits`).
    held_out: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    def sizes(self) -> dict[str, int]:
        return {
            "forget": int(self.forget.size),
            "remain": int(self.remain.size),
            "sample": int(self.sample.size),
            "forget_repeat": int(self.repeat),
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "forget": self.forget,
            "remain": self.remain,
            "sample": self.sample,
            "repeat": np.asarray(self.repeat),
        }

    @classmethod
    def from_arrays(cls, arrays: dict) -> Splits:
        return cls(
            forget=np.asarray(arrays["forget"], np.int64),
            remain=np.asarray(arrays["remain"], np.int64),
            sample=np.asarray(arrays["sample"], np.int64),
            repeat=int(np.asarray(arrays["repeat"])),
        )


def cifar100_class_spec(forget_class: int) -> ForgetSpec:
    """The reference's CIFAR-100 class removal: the 500 images of the class, repeated 10x
    (`catalog`'s `class_repeat`)."""
    from camu_jax.data import catalog

    return ForgetSpec(
        kind="class", classes=(forget_class,), repeat=catalog.info("cifar100").class_repeat
    )


def select_forget(labels: np.ndarray, spec: ForgetSpec, *, seed: int, num_classes: int):
    """Indices of D_f (sorted, unique). Raises ValueError naming any bad value."""
    labels = np.asarray(labels)
    n = labels.shape[0]
    rng = np.random.default_rng([seed, 1])
    if spec.kind == "class":
        if not spec.classes:
            raise ValueError("class removal needs at least one class")
        for c in spec.classes:
            if not 0 <= c < num_classes:
                raise ValueError(
                    f"forget class {c} is outside the label range 0..{num_classes - 1}"
                )
        forget = np.flatnonzero(np.isin(labels, spec.classes))
    elif spec.kind == "random":
        if not 0.0 < spec.fraction < 1.0:
            raise ValueError(f"forget fraction {spec.fraction} must lie strictly between 0 and 1")
        forget = np.sort(rng.choice(n, size=int(round(spec.fraction * n)), replace=False))
    elif spec.kind == "proportions":
        props = np.asarray(spec.proportions, np.float64)
        if props.shape != (num_classes,):
            raise ValueError(f"proportions must have {num_classes} entries, got {props.shape[0]}")
        if np.any(props < 0) or np.any(props > 1):
            raise ValueError(f"proportions must lie in [0, 1], got {spec.proportions}")
        parts = []
        for c in range(num_classes):
            members = np.flatnonzero(labels == c)
            k = int(round(props[c] * members.size))
            parts.append(rng.choice(members, size=k, replace=False))
        forget = np.sort(np.concatenate(parts))
    elif spec.kind == "indices":
        forget = np.asarray(spec.indices, np.int64)
        bad = forget[(forget < 0) | (forget >= n)]
        if bad.size:
            raise ValueError(f"forget indices out of range 0..{n - 1}: {bad[:10].tolist()}")
        uniq, counts = np.unique(forget, return_counts=True)
        if np.any(counts > 1):
            raise ValueError(f"duplicated forget indices: {uniq[counts > 1][:10].tolist()}")
        forget = uniq
    else:
        raise ValueError(
            f"unknown forget kind {spec.kind!r}; allowed: class, random, proportions, indices"
        )
    if forget.size == 0:
        raise ValueError(f"the forget set is empty for {spec}")
    if forget.size == n:
        raise ValueError(f"the forget set is the whole training set ({n} items); nothing remains")
    return forget.astype(np.int64)


def make_splits(
    labels: np.ndarray,
    spec: ForgetSpec,
    *,
    seed: int,
    num_classes: int,
    sample_size: int | None = None,
) -> Splits:
    """D_f by `spec`, D_r = the rest, D_s = a uniform random subset of D_r.

    Args:
      labels: `[n_train]` training labels.
      spec: what to forget.
      seed: selects D_f (random kinds) and D_s; same seed, same splits.
      num_classes: label range.
      sample_size: |D_s|; default `spec.repeat * |D_f|` (the reference's rule).
    """
    if spec.repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {spec.repeat}")
    forget = select_forget(labels, spec, seed=seed, num_classes=num_classes)
    mask = np.ones(np.asarray(labels).shape[0], bool)
    mask[forget] = False
    remain = np.flatnonzero(mask).astype(np.int64)
    size = spec.repeat * forget.size if sample_size is None else sample_size
    if not 0 < size <= remain.size:
        raise ValueError(f"sample size {size} must be in 1..{remain.size} (|D_r|)")
    rng = np.random.default_rng([seed, 2])
    sample = np.sort(rng.choice(remain, size=size, replace=False)).astype(np.int64)
    return Splits(forget=forget, remain=remain, sample=sample, repeat=spec.repeat)
