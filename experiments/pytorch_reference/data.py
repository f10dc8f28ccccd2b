"""Data handling of the reference (`dataset.py`, `prepare.py`), on in-memory tensors.

Deliberate differences from the reference, none of which slows the baseline down:

* Datasets are `TensorDataset`s of already preprocessed float tensors (`to_tensor`), not
  torchvision datasets that run a PIL `ToTensor` per item.
* `num_workers` defaults to 0 (the reference uses 3); pass 3 to get its behaviour. On a small
  CPU machine worker processes only add overhead for in-memory tensors.
* `prepare_*` collect the batches in a list and concatenate once (the reference grows a tensor
  with `torch.cat` in the loop and round-trips through NumPy).
* The label adjustment implements the *intended* rule (the reference's list comprehension
  shadows its loop variable, so it excludes the wrong class).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

BATCH_SIZE = 32


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """torchvision `ToTensor` for a whole array: uint8 `[N, H, W]` or `[N, H, W, C]` ->
    float32 `[N, C, H, W]` in [0, 1]. Float input is only transposed."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    # A fresh copy has canonical NCHW strides (a transposed view with C=1 would not, and
    # PyTorch would then pick channels-last kernels and break the CNN's `view`).
    x = torch.from_numpy(np.array(images.transpose(0, 3, 1, 2), order="C", copy=True))
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def tensor_dataset(images: np.ndarray | torch.Tensor, labels) -> TensorDataset:
    """`(x [N, C, H, W] float32, y [N] int64)`; NumPy images go through `to_tensor`."""
    x = images if isinstance(images, torch.Tensor) else to_tensor(images)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return TensorDataset(x, y)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int = BATCH_SIZE,
    shuffle: bool = True,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """The reference's `DataLoader(dataset, batch_size=32, shuffle=True, num_workers=3)`."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
    )


def prepare_factual(loader: DataLoader, device: torch.device | str = "cpu"):
    """One pass over the (shuffled) forgetting loader -> `(x_f, y_f)` on `device`."""
    xs, ys = [], []
    for data, targets in loader:
        xs.append(data.to(device))
        ys.append(targets.long().to(device))
    return torch.cat(xs), torch.cat(ys)


def prepare_counterfactual(
    loader: DataLoader,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
):
    """One pass over the (shuffled) sample loader -> `(x_s + U[0,1) noise, y_s)` on `device`."""
    xs, ys = [], []
    for data, targets in loader:
        data = data.to(device)
        noise = torch.rand(data.shape, generator=generator, device="cpu").to(device)
        xs.append(data + noise)
        ys.append(targets.long().to(device))
    return torch.cat(xs), torch.cat(ys)


def label_adjustment(
    forget_y: torch.Tensor, cf_y: torch.Tensor, num_classes: int, rng: random.Random | None = None
):
    """Where `cf_y[i] == forget_y[i]`, redraw `cf_y[i]` uniformly from the other classes.

    The reference's loop (intended rule; its comprehension shadows `i`). Python-level, as the
    reference; returns `(forget_y, new cf_y)`.
    """
    rng = rng or random
    cf_y = cf_y.clone()
    fy, cy = forget_y.tolist(), cf_y.tolist()
    for i in range(len(fy)):
        if cy[i] == fy[i]:
            cy[i] = rng.choice([c for c in range(num_classes) if c != fy[i]])
    return forget_y, torch.tensor(cy, dtype=torch.long, device=cf_y.device)


def counterfactual_generation(
    unlearn_loader: DataLoader,
    sample_loader: DataLoader,
    *,
    num_classes: int,
    device: torch.device | str = "cpu",
    rng: random.Random | None = None,
    generator: torch.Generator | None = None,
) -> TensorDataset:
    """`prepare.counterfactual_generation`: the quadruples `(x_f, y_f, x_cf, y_cf)`.

    The i-th item of the shuffled D_f pass is paired with the i-th item of the shuffled D_s
    pass (the reference's random one-to-one matching). Sizes must agree, as in the reference.
    The tensors stay on `device`; the returned dataset is served by `make_loader`.
    """
    x_f, y_f = prepare_factual(unlearn_loader, device)
    x_cf, y_cf = prepare_counterfactual(sample_loader, device, generator)
    if len(x_f) != len(x_cf):
        raise ValueError(f"|D_f| = {len(x_f)} but |D_s| = {len(x_cf)}; the reference needs equal")
    y_f, y_cf = label_adjustment(y_f, y_cf, num_classes, rng)
    return TensorDataset(x_f.cpu(), y_f.cpu(), x_cf.cpu(), y_cf.cpu())
