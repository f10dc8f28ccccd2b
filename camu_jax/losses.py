"""The two CaMU losses, as pure functions (`remove.py` of the reference).

Array arguments are keyword-only: swapping student and teacher would be silent otherwise.
`weights` (`[batch]`, 0/1) drops padded examples so that a padded batch computes exactly
what PyTorch computes on the short last batch of a `DataLoader`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy


def _weights(batch: int, weights: jax.Array | None, dtype) -> jax.Array:
    return jnp.ones((batch,), dtype) if weights is None else weights.astype(dtype)


def kl_sum(
    *,
    student_embedding: jax.Array,
    teacher_embedding: jax.Array,
    weights: jax.Array | None = None,
) -> jax.Array:
    """KL_sum(softmax(teacher) || softmax(student)), summed over batch and dimensions.

    PyTorch `KLDivLoss(reduction='sum')(log_softmax(student), softmax(teacher))`; softmax is
    over the embedding dimension. `xlogy` gives 0 where the teacher probability is 0, as PyTorch.

    Args:
      student_embedding: `[batch, dims]`, the model being unlearned.
      teacher_embedding: `[batch, dims]`, the frozen original model (no gradient flows).
      weights: optional `[batch]` example weights.
    """
    teacher_embedding = jax.lax.stop_gradient(teacher_embedding)
    p = jax.nn.softmax(teacher_embedding, axis=-1)
    log_q = jax.nn.log_softmax(student_embedding, axis=-1)
    per_example = jnp.sum(xlogy(p, p) - p * log_q, axis=-1)
    w = _weights(per_example.shape[0], weights, per_example.dtype)
    # `where`, not only `*`: a non-finite value in a padded row must not poison the sum.
    return jnp.sum(jnp.where(w > 0, per_example, 0.0) * w)


def cross_entropy_mean(
    *, logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """Mean softmax cross-entropy over the (weighted) batch: PyTorch `CrossEntropyLoss()`.

    Args:
      logits: `[batch, classes]`.
      labels: `[batch]` integer class ids.
      weights: optional `[batch]` example weights; the mean is over their sum.
    """
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    w = _weights(nll.shape[0], weights, nll.dtype)
    return jnp.sum(jnp.where(w > 0, nll, 0.0) * w) / jnp.maximum(jnp.sum(w), 1.0)


def representation_loss(
    *,
    student_sample: jax.Array,
    teacher_sample: jax.Array,
    student_forget: jax.Array,
    teacher_counterfactual: jax.Array,
    sample_weights: jax.Array | None = None,
    forget_weights: jax.Array | None = None,
    sample_coef: float = 0.5,
    forget_coef: float = 0.5,
) -> jax.Array:
    """L_rep = 0.5 KL_sum(z0(x_s) || z(x_s)) + 0.5 KL_sum(z0(x_cf) || z(x_f)), all `[batch, d]`."""
    return sample_coef * kl_sum(
        student_embedding=student_sample, teacher_embedding=teacher_sample, weights=sample_weights
    ) + forget_coef * kl_sum(
        student_embedding=student_forget,
        teacher_embedding=teacher_counterfactual,
        weights=forget_weights,
    )


def output_loss(
    *,
    sample_logits: jax.Array,
    sample_labels: jax.Array,
    forget_logits: jax.Array,
    counterfactual_labels: jax.Array,
    sample_weights: jax.Array | None = None,
    forget_weights: jax.Array | None = None,
    sample_coef: float = 0.9,
    forget_coef: float = 0.01,
) -> jax.Array:
    """L_out = 0.9 CE(f(x_s), y_s) + 0.01 CE(f(x_f), y_cf); logits `[batch, classes]`."""
    return sample_coef * cross_entropy_mean(
        logits=sample_logits, labels=sample_labels, weights=sample_weights
    ) + forget_coef * cross_entropy_mean(
        logits=forget_logits, labels=counterfactual_labels, weights=forget_weights
    )
