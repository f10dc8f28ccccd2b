"""Layers for Flax NNX models under the model contract (`camu_jax.models.nnx_models`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from camu_jax.models.layers import masked_moments, running_update


class BatchNorm(nnx.Module):
    """`camu_jax.models.BatchNorm` for NNX models: PyTorch's BatchNorm (momentum 0.1 as the
    weight of the new statistic, unbiased running variance) over every axis but the last, and
    `mask` (`[batch]`) keeps the padded rows of a short last batch out of the statistics.

    `nnx.BatchNorm` differs on both counts (momentum 0.99, no mask): on a short run its
    running averages barely move from their initial values, and evaluation reads them.
    Call it as `self.bn(x, train=train, mask=mask)`."""

    def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5):
        self.momentum = momentum
        self.epsilon = epsilon
        self.scale = nnx.Param(jnp.ones((num_features,)))
        self.bias = nnx.Param(jnp.zeros((num_features,)))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,)))
        self.var = nnx.BatchStat(jnp.ones((num_features,)))

    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None):
        if train:
            mean, var, count = masked_moments(x, mask)
            self.mean[...], self.var[...] = running_update(
                self.mean[...], self.var[...], mean, var, count, self.momentum
            )
        else:
            mean, var = self.mean[...], self.var[...]
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        return y * self.scale[...] + self.bias[...]
