"""Original-model training of the reference (`train.py: train`): Adam(1e-3, weight_decay=1e-4)
(coupled L2), cross-entropy, batch 32, the model in train mode."""

from __future__ import annotations

import torch
from torch import nn, optim


def make_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 1e-4) -> optim.Adam:
    return optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


_ce = nn.CrossEntropyLoss()


def train_step(
    model: nn.Module, optimizer: optim.Optimizer, data: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """One cross-entropy step on device tensors; returns the detached loss."""
    output = model(data)[0]
    loss = _ce(output, targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def train(
    model: nn.Module,
    train_loader,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """`epochs` passes over `train_loader` (the reference: 20, batch 32, shuffled)."""
    model.to(device)
    model.train()
    optimizer = make_optimizer(model, lr, weight_decay)
    for _ in range(epochs):
        for data, targets in train_loader:
            train_step(model, optimizer, data.to(device), targets.long().to(device))
    return model
