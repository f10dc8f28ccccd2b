"""The audits' one primitive: the logit-scaled confidence of every (model, example).

phi = log p_y - log(1 - p_y). With p = softmax(z), 1 - p_y is the sum of the other classes'
probabilities, so phi = z_y - logsumexp_{j != y} z_j: the margin of Georgiev et al.'s KLOM
(`RoyRin/data-unlearning-bench` `src/eval.py: get_margin`), the statistic LiRA fits Gaussians
to (`tensorflow/privacy` `research/mi_lira_2021/score.py`) and the NeurIPS 2023 challenge's
"logit-scaled confidence" (`google-deepmind/unlearning_evaluation` `metric.py:
compute_logit_scaled_confidence`). Those two compute it from float64 softmax probabilities with
a 1e-45 floor (`camu_jax.audits.reference.logit_scaled_confidence`), so theirs saturates near
+-103; the margin form needs neither the floor nor float64 and is exact for any logits.

`population_phi` is the device pass: the eval-mode logits of a population of models
(`camu_jax.prediction.predict`, one program per member count) turned into `[models, rows]`
phi and correctness on device, one fetch per wave.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from camu_jax import engine, sharding
from camu_jax.data.pipeline import DeviceData
from camu_jax.prediction import predict


def logit_scaled_confidence(*, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """phi `[...]` = z_y - logsumexp_{j != y} z_j of logits `[..., classes]` and integer labels
    `[...]` (pure; any leading axes, e.g. `[models, examples]`). Stable: logsumexp shifts by
    the largest other logit, so no probability is formed."""
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    own = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    z_y = jnp.sum(jnp.where(own, logits, 0), axis=-1)
    return z_y - jax.nn.logsumexp(jnp.where(own, -jnp.inf, logits), axis=-1)


@jax.jit
def _phi_and_correct(logits: jax.Array, labels: jax.Array):
    phi = logit_scaled_confidence(logits=logits, labels=labels)
    return phi, jnp.argmax(logits, axis=-1) == labels


def population_phi(
    model: nn.Module,
    variables: Sequence[dict | None],
    data: DeviceData,
    *,
    population_size: int | None = None,
    log=print,
) -> dict[str, np.ndarray]:
    """phi and top-1 correctness of every model on every row of `data`, in one batched device
    pass per wave of models (`population_size` at a time; default every model,
    `engine.place`).

    variables: one `{'params', 'batch_stats'}` per model; None for a model that does not
    exist (an unlearning run that diverged): its row is NaN / False and `valid` says so, as it
    does for a model whose phi is not finite.

    Returns `{'phi': [models, rows] float32, 'correct': [models, rows] bool, 'valid':
    [models] bool}` on the host.
    """
    count = len(variables)
    rows = data.size
    phi = np.full((count, rows), np.nan, np.float32)
    correct = np.zeros((count, rows), bool)
    present = [i for i, v in enumerate(variables) if v is not None]
    if present:
        placement = engine.place(population_size, len(present), data.mesh, what="phi", log=log)
        placed, size = data.on(placement.mesh), placement.size
        labels = placed.host_labels
        for lo in range(0, len(present), size):
            wave = present[lo : lo + size]
            trees = [variables[i] for i in wave]
            trees += [trees[0]] * (size - len(trees))  # padding members, dropped below
            stacked = sharding.shard_members(engine.stack(trees), placement.mesh)
            logits = predict(model, stacked, placed, fetch=False)
            padded = np.zeros(logits.shape[1], np.int32)
            padded[:rows] = labels
            # labels [width] broadcast over the members' logits [members, width, classes]
            out = sharding.fetch(_phi_and_correct(logits, padded))
            phi[wave] = out[0][: len(wave), :rows]
            correct[wave] = out[1][: len(wave), :rows]
    valid = np.isfinite(phi).all(axis=1)
    phi[~valid] = np.nan
    correct[~valid] = False
    return {"phi": phi, "correct": correct, "valid": valid}
