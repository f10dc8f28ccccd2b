"""The intervention: counterfactual samples for the forgetting set (`prepare.py`).

Each forgetting item i is paired one-to-one with a sample-set item pair[i]; its counterfactual
input is `x_s[pair[i]] + eps`, `eps ~ U[0, 1)` per pixel on the preprocessed input (no
clipping), and its counterfactual label is `y_s[pair[i]]`, redrawn uniformly from the other
classes where it equals the forgetting label. (The reference's label redraw reuses its loop
variable, so the excluded class is not the item's own; this is the intended rule.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


class Counterfactuals(struct.PyTreeNode):
    """Pairing and labels of the counterfactuals; the noise is drawn from `noise_key`.

    pair: `[n_forget]` indices into the sample set (a permutation when sizes are equal).
    labels: `[n_forget]` counterfactual labels y_cf.
    noise_key: key from which `counterfactual_noise` draws item i's noise (fixed per item, so
      the counterfactuals are built once and identical in every epoch).
    """

    pair: jax.Array
    labels: jax.Array
    noise_key: jax.Array


def make_counterfactuals(
    key: jax.Array,
    *,
    forget_labels: jax.Array,
    sample_labels: jax.Array,
    num_classes: int,
) -> Counterfactuals:
    """Random one-to-one pairing, and counterfactual labels that never equal the forget label.

    Args:
      key: PRNG key.
      forget_labels: `[n_forget]` labels y_f.
      sample_labels: `[n_sample]` labels of the sample set D_s.
      num_classes: number of classes (>= 2).

    If `n_sample < n_forget` the permutation is tiled, so some sample items are used twice.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    n_forget, n_sample = forget_labels.shape[0], sample_labels.shape[0]
    if n_forget == 0 or n_sample == 0:
        raise ValueError(f"empty set: n_forget={n_forget}, n_sample={n_sample}")
    pair_key, label_key, noise_key = jax.random.split(key, 3)
    reps = -(-n_forget // n_sample)
    perm = jnp.concatenate(
        [jax.random.permutation(k, n_sample) for k in jax.random.split(pair_key, reps)]
    )[:n_forget]
    labels = sample_labels[perm].astype(jnp.int32)
    forget_labels = forget_labels.astype(jnp.int32)
    # Uniform over the num_classes - 1 classes other than y_f: draw r in [0, C-1), skip y_f.
    r = jax.random.randint(label_key, (n_forget,), 0, num_classes - 1)
    redrawn = r + (r >= forget_labels).astype(jnp.int32)
    labels = jnp.where(labels == forget_labels, redrawn, labels)
    return Counterfactuals(pair=perm, labels=labels, noise_key=noise_key)


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
