"""Flax models. Every model maps `[batch, H, W, C]` to `(logits, embedding)`."""

from __future__ import annotations

from flax import linen as nn

from camu_jax.models.cnn import CNN
from camu_jax.models.layers import BatchNorm, max_pool_2x2
from camu_jax.models.resnet import ResNet18

MODELS = ("cnn", "resnet18", "resnet18_cifar")


def create_model(name: str, *, num_classes: int) -> nn.Module:
    """Builds a model by name: `cnn`, `resnet18` (ImageNet stem) or `resnet18_cifar`."""
    if name == "cnn":
        return CNN(num_classes=num_classes)
    if name == "resnet18":
        return ResNet18(num_classes=num_classes, stem="imagenet")
    if name == "resnet18_cifar":
        return ResNet18(num_classes=num_classes, stem="cifar")
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")


__all__ = ["CNN", "MODELS", "BatchNorm", "ResNet18", "create_model", "max_pool_2x2"]
