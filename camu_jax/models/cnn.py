"""The reference CNN (`Model.py` of CaMU) for MNIST-like inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from camu_jax.models.layers import max_pool_2x2, torch_conv, torch_dense


class CNN(nn.Module):
    """conv5x5(16)-ReLU-pool, conv5x5(32)-ReLU-pool, fc 256 (embedding), fc 128, fc classes.

    Exactly the reference: no nonlinearity after the embedding or between the two head
    layers. The flatten uses PyTorch's channel-major order so weights convert 1:1.

    Returns `(logits [batch, num_classes], embedding [batch, 256])`.
    """

    num_classes: int = 10
    head_modules = ("fc2", "fc3")  # After the embedding (fc1); step A leaves them alone.

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, mask: jax.Array | None = None):
        del train, mask  # No BatchNorm or dropout: the same function in both modes.
        x = torch_conv(16, 5, x.shape[-1], 2, "conv1")(x)
        x = max_pool_2x2(nn.relu(x))
        x = torch_conv(32, 5, 16, 2, "conv2")(x)
        x = max_pool_2x2(nn.relu(x))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        embedding = torch_dense(256, x.shape[-1], "fc1")(x)
        h = torch_dense(128, 256, "fc2")(embedding)
        logits = torch_dense(self.num_classes, 128, "fc3")(h)
        return logits, embedding
