"""The intervention: counterfactual samples for the forgetting set (`prepare.py`).

Each forgetting item i is paired one-to-one with a sample-set item pair[i]; its counterfactual
input is `x_s[pair[i]] + eps`, `eps ~ U[0, 1)` per pixel on the preprocessed input (no
clipping), and its counterfactual label is `y_s[pair[i]]`, redrawn uniformly from the other
classes where it equals the forgetting label. (The reference's label redraw reuses its loop
variable, so the excluded class is not the item's own; this is the intended rule.)
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Counterfactuals:
    """Pairing and labels of the counterfactuals (host arrays).

    pair: `[n_forget]` indices into the sample set (a permutation when sizes are equal).
    labels: `[n_forget]` counterfactual labels y_cf.

    The noise of item i is `counterfactual_noise(noise_key, i)`: a fixed function of the item
    id, so the counterfactuals are built once and identical in every epoch.
    """

    pair: np.ndarray
    labels: np.ndarray


def make_counterfactuals(
    rng: np.random.Generator,
    *,
    forget_labels: np.ndarray,
    sample_labels: np.ndarray,
    num_classes: int,
) -> Counterfactuals:
    """Random one-to-one pairing, and counterfactual labels that never equal the forget label.

    The pairing is index selection, drawn on the host like the splits: it compiles nothing
    and does not depend on how many other runs share a population.

    Args:
      rng: numpy generator (e.g. `np.random.default_rng([seed, 6])`).
      forget_labels: `[n_forget]` labels y_f.
      sample_labels: `[n_sample]` labels of the sample set D_s.
      num_classes: number of classes (>= 2).

    If `n_sample < n_forget` the permutation is tiled, so some sample items are used twice.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    forget_labels = np.asarray(forget_labels, np.int64)
    sample_labels = np.asarray(sample_labels, np.int64)
    n_forget, n_sample = forget_labels.shape[0], sample_labels.shape[0]
    if n_forget == 0 or n_sample == 0:
        raise ValueError(f"empty set: n_forget={n_forget}, n_sample={n_sample}")
    reps = -(-n_forget // n_sample)
    pair = np.concatenate([rng.permutation(n_sample) for _ in range(reps)])[:n_forget]
    labels = sample_labels[pair]
    # Uniform over the num_classes - 1 classes other than y_f: draw r in [0, C-1), skip y_f.
    r = rng.integers(0, num_classes - 1, n_forget)
    redrawn = r + (r >= forget_labels)
    labels = np.where(labels == forget_labels, redrawn, labels)
    return Counterfactuals(pair=pair.astype(np.int32), labels=labels.astype(np.int32))


def counterfactual_noise(noise_key: jax.Array, item_ids: jax.Array, shape) -> jax.Array:
    """U[0, 1) noise `[len(item_ids), *shape]`, a fixed function of each item id."""
    keys = jax.vmap(lambda i: jax.random.fold_in(noise_key, i))(item_ids)
    return jax.vmap(lambda k: jax.random.uniform(k, shape))(keys)


def counterfactual_inputs(
    noise_key: jax.Array, *, item_ids: jax.Array, sample_inputs: jax.Array
) -> jax.Array:
    """x_cf = x_s + eps for the preprocessed paired inputs `[batch, H, W, C]`."""
    noise = counterfactual_noise(noise_key, item_ids, sample_inputs.shape[1:])
    return sample_inputs + noise.astype(sample_inputs.dtype)
