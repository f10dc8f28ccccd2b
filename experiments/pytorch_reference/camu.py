"""The reference's unlearning loop (`remove.py: causal_effect_removel`), device agnostic.

Kept as the reference does it: two `torch.optim.Adam(weight_decay=1e-4)` over all
parameters, the frozen model in eval mode and its embeddings recomputed on every step, the
new model in train mode, one counterfactual batch zipped with one sample batch per step, and
no `.item()` (so no host sync) inside the loop.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import Dataset

from .data import counterfactual_generation, make_loader


@dataclasses.dataclass(frozen=True)
class Coefficients:
    """Loss weights: L_rep = 0.5 / 0.5, L_out = 0.9 (D_s) / 0.01 (D_f with y_cf)."""

    rep_sample: float = 0.5
    rep_forget: float = 0.5
    out_sample: float = 0.9
    out_forget: float = 0.01


def make_optimizers(
    new_model: nn.Module, *, kl_lr: float, impair_lr: float, weight_decay: float = 1e-4
) -> tuple[optim.Adam, optim.Adam]:
    """optimizer1 (step A, KL_LR) and optimizer2 (step B, IMPAIR_LR), separate moments."""
    optimizer1 = optim.Adam(new_model.parameters(), lr=kl_lr, weight_decay=weight_decay)
    optimizer2 = optim.Adam(new_model.parameters(), lr=impair_lr, weight_decay=weight_decay)
    return optimizer1, optimizer2


_kl = nn.KLDivLoss(reduction="sum")
_ce = nn.CrossEntropyLoss()


def camu_step(
    trained_model: nn.Module,
    new_model: nn.Module,
    optimizer1: optim.Optimizer,
    optimizer2: optim.Optimizer,
    data: torch.Tensor,
    treatment_x: torch.Tensor,
    treatment_y: torch.Tensor,
    remain_x: torch.Tensor,
    remain_y: torch.Tensor,
    coefficients: Coefficients = Coefficients(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One double step on device tensors; returns the detached `(loss2 = L_rep, loss4 = L_out)`.

    `data` = x_f, `treatment_x/y` = x_cf/y_cf, `remain_x/y` = x_s/y_s. Modes are the caller's
    business (teacher `eval()`, new model `train()`), as in the reference loop.
    """
    c = coefficients
    with torch.no_grad():
        embedding1 = trained_model(remain_x)[1]
    embedding2 = new_model(remain_x)[1]
    embedding1 = F.softmax(embedding1, dim=1)
    embedding2 = F.log_softmax(embedding2, dim=1)
    with torch.no_grad():
        embedding4 = trained_model(treatment_x)[1]
    embedding3 = new_model(data)[1]
    embedding3 = F.log_softmax(embedding3, dim=1)
    embedding4 = F.softmax(embedding4, dim=1)
    loss2 = c.rep_sample * _kl(embedding2, embedding1) + c.rep_forget * _kl(embedding3, embedding4)
    optimizer1.zero_grad()
    loss2.backward()
    optimizer1.step()

    output1 = new_model(data)[0]
    output3 = new_model(remain_x)[0]
    loss4 = c.out_sample * _ce(output3, remain_y) + c.out_forget * _ce(output1, treatment_y)
    optimizer2.zero_grad()
    loss4.backward()
    optimizer2.step()
    return loss2.detach(), loss4.detach()


def causal_effect_removal(
    trained_model: nn.Module,
    new_model: nn.Module,
    close_loader,
    sample_loader,
    *,
    epochs: int,
    kl_lr: float,
    impair_lr: float,
    device: torch.device | str = "cpu",
    coefficients: Coefficients = Coefficients(),
) -> nn.Module:
    """`remove.causal_effect_removel`: `epochs` passes of `zip(close_loader, sample_loader)`."""
    trained_model.to(device)
    trained_model.eval()
    new_model.to(device)
    new_model.train()
    optimizer1, optimizer2 = make_optimizers(new_model, kl_lr=kl_lr, impair_lr=impair_lr)
    for _ in range(epochs):
        for (data, _targets, treatment_x, treatment_y), (remain_x, remain_y) in zip(
            close_loader, sample_loader, strict=False
        ):
            camu_step(
                trained_model,
                new_model,
                optimizer1,
                optimizer2,
                data.to(device),
                treatment_x.float().to(device),
                treatment_y.long().to(device),
                remain_x.to(device),
                remain_y.long().to(device),
                coefficients,
            )
    return new_model


def unlearn(
    trained_model: nn.Module,
    unlearn_set: Dataset,
    sample_set: Dataset,
    *,
    num_classes: int,
    epochs: int,
    kl_lr: float,
    impair_lr: float,
    device: torch.device | str = "cpu",
    seed: int = 0,
    num_workers: int = 0,
    batch_size: int = 32,
    new_model: nn.Module | None = None,
) -> nn.Module:
    """The timed part of `main.py`: counterfactual construction, then the unlearning loop.

    Loaders over D_f and D_s (shuffled, batch 32) are built here from the datasets; the
    new model is a deep copy of `trained_model` unless given. Seeds torch and `random`
    locally through generators, so calls are reproducible.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    if new_model is None:
        new_model = copy.deepcopy(trained_model)
    unlearn_loader = make_loader(
        unlearn_set, batch_size=batch_size, num_workers=num_workers, generator=gen
    )
    sample_loader = make_loader(
        sample_set, batch_size=batch_size, num_workers=num_workers, generator=gen
    )
    close_dataset = counterfactual_generation(
        unlearn_loader,
        sample_loader,
        num_classes=num_classes,
        device=device,
        rng=rng,
        generator=gen,
    )
    close_loader = make_loader(
        close_dataset, batch_size=batch_size, num_workers=num_workers, generator=gen
    )
    causal_effect_removal(
        trained_model,
        new_model,
        close_loader,
        sample_loader,
        epochs=epochs,
        kl_lr=kl_lr,
        impair_lr=impair_lr,
        device=device,
    )
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return new_model
