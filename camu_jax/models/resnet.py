"""ResNet18 as torchvision builds it, with an ImageNet stem or a CIFAR stem."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import linen as nn

from camu_jax.models.layers import BatchNorm, Conv, torch_dense

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", relu).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, name: str) -> Conv:
    # Explicit symmetric padding: Flax "SAME" pads (0, 1) for stride 2, PyTorch pads (1, 1).
    return Conv(
        features,
        kernel,
        stride=stride,
        padding=kernel // 2,
        use_bias=False,
        kernel_init=_conv_init,
        name=name,
    )


class BasicBlock(nn.Module):
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, *, train: bool, mask):
        residual = x
        y = _conv(self.features, 3, self.stride, "conv1")(x)
        y = nn.relu(BatchNorm(name="bn1")(y, train=train, mask=mask))
        y = _conv(self.features, 3, 1, "conv2")(y)
        y = BatchNorm(name="bn2")(y, train=train, mask=mask)
        if self.stride != 1 or x.shape[-1] != self.features:
            residual = _conv(self.features, 1, self.stride, "downsample_conv")(x)
            residual = BatchNorm(name="downsample_bn")(residual, train=train, mask=mask)
        return nn.relu(y + residual)


class ResNet18(nn.Module):
    """torchvision `resnet18()` layout; `stem="imagenet"` (7x7/2 conv + 3x3/2 max-pool, for
    224x224 inputs as the reference) or `stem="cifar"` (3x3/1 conv, no pool, for 32x32).

    Returns `(logits [batch, num_classes], embedding [batch, 512])`; `mask` (`[batch]`)
    keeps padded examples out of the BatchNorm statistics.
    """

    num_classes: int = 10
    stem: Literal["imagenet", "cifar"] = "imagenet"
    head_modules = ("fc",)  # After the embedding; step A leaves it alone.

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, mask: jax.Array | None = None):
        if self.stem == "imagenet":
            x = _conv(64, 7, 2, "conv1")(x)
        elif self.stem == "cifar":
            x = _conv(64, 3, 1, "conv1")(x)
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        x = nn.relu(BatchNorm(name="bn1")(x, train=train, mask=mask))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, features in enumerate((64, 128, 256, 512)):
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(features, stride, name=f"layer{stage + 1}_{block}")(
                    x, train=train, mask=mask
                )
        embedding = jnp.mean(x, axis=(1, 2))
        logits = torch_dense(self.num_classes, 512, "fc")(embedding)
        return logits, embedding
