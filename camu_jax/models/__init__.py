"""Flax models and the contract every model, library or user-written, follows.

A model is a linen module or a Flax NNX module (`camu_jax.models.nnx_models`) with
  * `__call__(x, *, train, mask) -> (logits, embedding)`: `x` `[batch, ...]` float32 (images
    `[batch, H, W, C]`, features `[batch, D]`, sequences `[batch, T, D]`), `train` (BatchNorm
    batch statistics vs running averages, dropout on vs off), `mask` `[batch]` 0/1 or None
    (the padded rows of a short last batch, which BatchNorm must ignore; a model without
    BatchNorm may ignore it too), `logits` `[batch, classes]` and `embedding` `[batch, ...]`
    (what L_rep compares with the frozen original's);
  * `head_modules`: the names of the top-level parameter collections (NNX: attributes) after
    the embedding (the classifier head), which CaMU's step A leaves alone.
Stochastic layers draw from named RNG streams (`'dropout'`...) in train mode only: each stream
gets a key per member and step (`camu_jax.models.randomness`); with `train=False` none is
given. BatchNorm is the project's (`BatchNorm`, `NnxBatchNorm`): Flax's own is warned about.
`check_model`, `init_variables` and `apply_model` (`camu_jax.models.calling`) check the
contract and say what is missing.
"""

from __future__ import annotations

from flax import linen as nn

from camu_jax.models import nnx_models
from camu_jax.models.calling import (
    StockBatchNormWarning,
    apply_model,
    check_model,
    init_variables,
    output_shapes,
)
from camu_jax.models.cnn import CNN
from camu_jax.models.layers import BatchNorm, max_pool_2x2
from camu_jax.models.nnx_layers import BatchNorm as NnxBatchNorm
from camu_jax.models.randomness import step_rngs
from camu_jax.models.resnet import ResNet18

MODELS = ("cnn", "resnet18", "resnet18_cifar")


def head_modules(model) -> tuple[str, ...]:
    """The model's `head_modules`: top-level parameter collections after the embedding.

    L_rep depends on the embedding only, so these get no gradient from it; PyTorch's optimizer
    then skips them in step A (`grad is None`: no Adam update, no weight decay). A model
    without the attribute is refused rather than given `()`: step A would then decay its head,
    which the reference never does.
    """
    heads = getattr(model, "head_modules", None)
    if heads is None and hasattr(model, "nnx_class"):
        # `nnx.bridge.to_linen(Net, ...)`: the wrapper's parameters are Net's attributes.
        heads = getattr(model.nnx_class, "head_modules", None)
    if heads is None:
        raise TypeError(
            f"{type(model).__name__} has no `head_modules` attribute: CaMU's step A must know "
            "which top-level parameter collections follow the embedding (the classifier head) "
            "to leave them alone, as the reference does. Declare it on the class, e.g. "
            "`head_modules = ('fc',)`, or `()` if no parameters follow the embedding."
        )
    if isinstance(heads, str) or not all(isinstance(h, str) for h in heads):
        raise TypeError(
            f"{type(model).__name__}.head_modules must be a tuple of parameter collection "
            f"names, got {heads!r}"
        )
    return tuple(heads)


def state_variables(state) -> dict:
    """`{'params', 'batch_stats'}` of a model's variables (a dict) or of a training state (any
    object with `params` and `batch_stats`: a phase's state, which the next stage of a method
    starts from)."""
    if isinstance(state, dict):
        return {"params": state["params"], "batch_stats": state["batch_stats"]}
    return {"params": state.params, "batch_stats": state.batch_stats}


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
    "BatchNorm",
    "CNN",
    "MODELS",
    "NnxBatchNorm",
    "ResNet18",
    "StockBatchNormWarning",
    "apply_model",
    "check_model",
    "create_model",
    "head_modules",
    "init_variables",
    "max_pool_2x2",
    "nnx_models",
    "output_shapes",
    "state_variables",
    "step_rngs",
]
