"""The reference's models (`Model.py` of CaMU) in plain PyTorch, without torchvision.

Module names and parameter layout follow the reference, so a `state_dict` saved by the
reference (`original.pt`) loads as is:

* `CNN`: `conv1.0`, `conv2.0` (conv inside `Sequential(conv, ReLU, MaxPool)`), `fc1` (the
  embedding), `fc2.0`, `fc2.1` (two linear layers with no nonlinearity between them).
* `ReferenceResNet`: `feature_extractor` = every child of torchvision's `resnet18()` but its
  `fc` (so `feature_extractor.0` is `conv1`, `.1` `bn1`, `.4`-`.7` `layer1`-`layer4`), head
  `fc2`. `resnet18()` below rebuilds torchvision's network and initialisation exactly
  (kaiming-normal fan-out convolutions, BatchNorm weight 1 / bias 0, default `Linear`).

Every model returns `(logits, embedding)`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Stem = Literal["imagenet", "cifar"]


class CNN(nn.Module):
    """conv5x5(16)-ReLU-pool, conv5x5(32)-ReLU-pool, fc1 1568->256 (embedding), 256->128->10.

    `image_size` other than MNIST's 28 (8 for scikit-learn's digits) changes only fc1's input
    size, 32 * (image_size // 4)^2, as the Flax CNN's `Dense` infers it.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=5, stride=1, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(16, 32, 5, 1, 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(32 * (image_size // 4) ** 2, 256)
        self.fc2 = nn.Sequential(nn.Linear(256, 128), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        x = self.conv2(x)
        x = x.view(x.size(0), -1)
        embedding = self.fc1(x)
        output = self.fc2(embedding)
        return output, embedding


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's `BasicBlock` (expansion 1)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's `ResNet` with `BasicBlock` and an ImageNet or CIFAR stem.

    The CIFAR stem (3x3/1 conv, no max-pool) keeps the child order of the ImageNet one
    (`maxpool` becomes `Identity`), so both wrap into `ReferenceResNet` identically.
    """

    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 1000, stem: Stem = "imagenet"):
        super().__init__()
        self.inplanes = 64
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        if stem == "imagenet":
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, stem: Stem = "imagenet") -> ResNet:
    """torchvision `resnet18()` (random init); `stem="cifar"` for 32x32 inputs."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, stem=stem)


class ReferenceResNet(nn.Module):
    """The reference's `ResNet`: resnet18 minus its `fc` as `feature_extractor`, head `fc2`;
    embedding = the 512-d global average pool."""

    def __init__(self, num_classes: int = 10, stem: Stem = "imagenet"):
        super().__init__()
        resnet = resnet18(stem=stem)
        num_features = resnet.fc.in_features
        self.feature_extractor = nn.Sequential(*list(resnet.children())[:-1])
        self.fc2 = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.feature_extractor(x).squeeze(3).squeeze(2)
        output = self.fc2(embedding)
        return output, embedding


def create_model(name: str, *, num_classes: int) -> nn.Module:
    """`cnn`, `resnet18` (ImageNet stem) or `resnet18_cifar`, as `camu_jax.models`."""
    if name == "cnn":
        return CNN(num_classes=num_classes)
    if name == "resnet18":
        return ReferenceResNet(num_classes=num_classes, stem="imagenet")
    if name == "resnet18_cifar":
        return ReferenceResNet(num_classes=num_classes, stem="cifar")
    raise ValueError(f"unknown model {name!r}; allowed: cnn, resnet18, resnet18_cifar")
