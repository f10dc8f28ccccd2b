"""Accuracy as the reference measures it (`train.py: test`): eval mode, no grad, batch 32."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from .data import make_loader


@torch.no_grad()
def test(
    model: nn.Module,
    test_loader,
    output_label=None,
    *,
    device: torch.device | str = "cpu",
) -> float:
    """Accuracy in percent over `test_loader`; with `output_label` (a collection of class ids)
    only over the examples whose label is in it."""
    model.to(device)
    model.eval()
    preds, targets = [], []
    for x, y in test_loader:
        logits, _ = model(x.to(device))
        preds.append(logits.argmax(dim=1).cpu())
        targets.append(y.long().cpu())
    pred, target = torch.cat(preds), torch.cat(targets)
    if output_label is not None:
        keep = torch.isin(target, torch.as_tensor(list(output_label), dtype=torch.long))
        pred, target = pred[keep], target[keep]
    if target.numel() == 0:
        return float("nan")
    return 100.0 * (pred == target).sum().item() / target.numel()


def accuracy(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    output_label=None,
) -> float:
    """`test` over an unshuffled batch-32 loader of `dataset` (the reference's setting)."""
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False)
    return test(model, loader, output_label, device=device)
