"""Every fact about a dataset in one place: name, classes, family, default model, class repeat.

The family says which of the reference's presets and transforms apply: `mnist` (28x28 or 8x8
greyscale, the CNN, inputs in [0, 1]) or `cifar` (32x32 colour, ResNet18, ImageNet
normalisation and augmentation).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    family: str  # "mnist" or "cifar"
    default_model: str  # the reference's model for it
    # Class removal repeats D_f this many times (the reference repeats CIFAR-100's 500 images
    # of a class 10x, and samples |D_s| = 10 |D_f|).
    class_repeat: int = 1
    note: str = ""


CATALOG: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo("digits", 10, "mnist", "cnn", note="scikit-learn's 8x8 digits, ships offline"),
        DatasetInfo("mnist", 10, "mnist", "cnn"),
        DatasetInfo("fashion_mnist", 10, "mnist", "cnn"),
        DatasetInfo("cifar10", 10, "cifar", "resnet18"),
        DatasetInfo("cifar100", 100, "cifar", "resnet18", class_repeat=10),
    )
}
NAMES: tuple[str, ...] = tuple(CATALOG)


def info(name: str) -> DatasetInfo:
    """The catalog entry of `name`; raises ValueError naming an unknown dataset."""
    if name not in CATALOG:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(NAMES)}")
    return CATALOG[name]
