"""Flax models. Every model maps `[batch, H, W, C]` to `(logits, embedding)`."""

from __future__ import annotations

from flax import linen as nn

from camu_jax.models.cnn import CNN
from camu_jax.models.layers import BatchNorm, max_pool_2x2
from camu_jax.models.resnet import ResNet18

MODELS = ("cnn", "resnet18", "resnet18_cifar")


def head_modules(model: nn.Module) -> tuple[str, ...]:
    """Top-level parameter collections after the embedding (the classifier head).

    L_rep depends on the embedding only, so these get no gradient from it; PyTorch's optimizer
    then skips them in step A (`grad is None`: no Adam update, no weight decay).
    """
    if isinstance(model, CNN):
        return ("fc2", "fc3")
    if isinstance(model, ResNet18):
        return ("fc",)
    return tuple(getattr(model, "head_modules", ()))


def create_model(name: str, *, num_classes: int) -> nn.Module:
    """Builds a model by name: `cnn`, `resnet18` (ImageNet stem) or `resnet18_cifar`."""
    if name == "cnn":
        return CNN(num_classes=num_classes)
    if name == "resnet18":
        return ResNet18(num_classes=num_classes, stem="imagenet")
    if name == "resnet18_cifar":
        return ResNet18(num_classes=num_classes, stem="cifar")
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")


__all__ = [
    "CNN",
    "MODELS",
    "BatchNorm",
    "ResNet18",
    "create_model",
    "head_modules",
    "max_pool_2x2",
]
