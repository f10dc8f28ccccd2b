"""Which model trains on what: the shadow populations of the audits, as pure functions of
(data size or labels, model count, forget set, seed), numpy on the host.

* U-LiRA (`ulira_design`): members 2k and 2k + 1 train on complementary random halves of the
  training set, so every example is IN for exactly half the models; each member forgets a
  random `forget_fraction` of its own half. Per (model, example): `forgot` (trained on it and
  unlearned it: the attack's IN) or `unseen` (never trained on it: OUT); an example a model
  trained on and kept is neither.
* KLOM and the epsilon score (`forget_design`): one forget set F (random, or whole classes)
  for every model: N originals on D, each unlearned once, and the oracles retrained on D \\ F
  (the reference oracles from their own seeds, the floor oracles from the originals' seeds, so
  that the floor is Retrain as a method: what a perfect unlearner scores at this N).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from camu_jax.data.splits import ForgetSpec, Splits, make_splits

# Roles of `member_seed`: one seed stream per population.
ULIRA, ORIGINAL, ORACLE = 1, 2, 3


def member_seed(seed: int, role: int, index: int) -> int:
    """A seed in [0, 2**31) (what `camu_jax.keys.key_data` takes) for member `index` of
    population `role`, a fixed function of `seed`."""
    return int(np.random.SeedSequence([seed, role, index]).generate_state(1)[0] >> 1)


def digest(rows: np.ndarray) -> str:
    """12 hex digits of sha256 of sorted int64 rows: names a training set in checkpoints."""
    return hashlib.sha256(np.sort(np.asarray(rows, np.int64)).tobytes()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True, eq=False)
class UliraDesign:
    """`splits[i]` (forget, remain = half \\ forget, sample, held_out = the other half) and
    `seeds[i]` of model i; `trained`, `forgot`: `[models, n]` bool."""

    splits: list[Splits]
    seeds: list[int]
    trained: np.ndarray
    forgot: np.ndarray

    @property
    def halves(self) -> list[np.ndarray]:
        return [np.flatnonzero(t) for t in self.trained]

    @property
    def unseen(self) -> np.ndarray:
        return ~self.trained


def ulira_design(n: int, *, models: int, forget_fraction: float, seed: int) -> UliraDesign:
    """The U-LiRA shadow design over `n` training examples (module docstring)."""
    check_models(models)
    check_fraction(forget_fraction)
    trained = np.zeros((models, n), bool)
    for k in range(models // 2):
        order = np.random.default_rng([seed, 40, k]).permutation(n)
        trained[2 * k, order[: n // 2]] = True
        trained[2 * k + 1, order[n // 2 :]] = True
    forgot = np.zeros_like(trained)
    splits = []
    for i in range(models):
        half = np.flatnonzero(trained[i])
        rng = np.random.default_rng([seed, 41, i])
        size = int(round(forget_fraction * half.size))
        if not 0 < size < half.size:
            raise ValueError(
                f"forget fraction {forget_fraction} of a half of {half.size} examples gives "
                f"{size} to forget; it must leave at least one on each side"
            )
        forget = np.sort(rng.choice(half, size=size, replace=False))
        forgot[i, forget] = True
        remain = np.setdiff1d(half, forget)
        sample = np.sort(rng.choice(remain, size=size, replace=False))
        splits.append(
            Splits(
                forget=forget, remain=remain, sample=sample, held_out=np.flatnonzero(~trained[i])
            )
        )
    seeds = [member_seed(seed, ULIRA, i) for i in range(models)]
    return UliraDesign(splits, seeds, trained, forgot)


@dataclasses.dataclass(frozen=True, eq=False)
class ForgetDesign:
    """One forget set for N models: `splits[i]` of original i (its own D_s), the seeds of the
    originals (also the floor oracles') and of the reference oracles."""

    forget: np.ndarray
    remain: np.ndarray
    splits: list[Splits]
    original_seeds: list[int]
    oracle_seeds: list[int]


def forget_design(
    labels: np.ndarray,
    *,
    models: int,
    forget_fraction: float,
    classes: tuple[int, ...] | None,
    seed: int,
    num_classes: int,
) -> ForgetDesign:
    """KLOM's and the epsilon score's forget set: whole `classes`, or a random
    `forget_fraction` of the training set (drawn from `seed`)."""
    check_models(models)
    spec = (
        ForgetSpec(kind="class", classes=tuple(classes))
        if classes
        else ForgetSpec(kind="random", fraction=check_fraction(forget_fraction))
    )
    base = make_splits(labels, spec, seed=seed, num_classes=num_classes)
    originals = [member_seed(seed, ORIGINAL, i) for i in range(models)]
    fixed = ForgetSpec(kind="indices", indices=tuple(int(i) for i in base.forget))
    splits = [make_splits(labels, fixed, seed=s, num_classes=num_classes) for s in originals]
    oracles = [member_seed(seed, ORACLE, i) for i in range(models)]
    return ForgetDesign(base.forget, base.remain, splits, originals, oracles)


def check_models(models) -> int:
    """Raises ValueError unless `models` is an even integer >= 2 (U-LiRA pairs members 2k and
    2k + 1 on complementary halves; KLOM's floor compares the same count)."""
    if isinstance(models, bool) or not isinstance(models, int | np.integer):
        raise ValueError(f"models must be an even integer >= 2, got {models!r}")
    if models < 2 or models % 2:
        raise ValueError(
            f"models {models} must be even and at least 2: U-LiRA pairs members 2k and 2k+1 "
            "on complementary halves of the training set"
        )
    return int(models)


def check_fraction(fraction) -> float:
    """Raises ValueError unless 0 < `fraction` < 1 (also NaN)."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float | np.floating):
        raise ValueError(f"forget fraction must be a number in (0, 1), got {fraction!r}")
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"forget fraction {fraction} must lie strictly between 0 and 1")
    return float(fraction)
