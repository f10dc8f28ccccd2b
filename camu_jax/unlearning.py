"""CaMU's entry points: `unlearn` (one run) and `unlearn_population` (many runs as one program).

The method itself lives in `camu_jax.methods.camu` (`CamuConfig` is its config); any method of
`camu_jax.methods` runs the same way through `camu_jax.methods.run_population`.
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import linen as nn

from camu_jax.data.pipeline import DeviceData
from camu_jax.data.splits import Splits
from camu_jax.methods.base import run_population
from camu_jax.methods.camu import CamuConfig, camu_preset

__all__ = ["CamuConfig", "camu_preset", "unlearn", "unlearn_population"]


def unlearn_population(
    model: nn.Module,
    originals: Sequence[dict],
    *,
    data: DeviceData,
    splits: Sequence[Splits],
    seeds: Sequence[int],
    num_classes: int,
    config: CamuConfig,
    **kwargs,
) -> list[tuple[dict, dict]]:
    """Runs CaMU for every member (frozen original `originals[i]`, `splits[i]`, `seeds[i]`);
    see `camu_jax.methods.run_population` for the keyword arguments and `info`."""
    return run_population(
        config,
        model,
        originals,
        data=data,
        splits=splits,
        seeds=seeds,
        num_classes=num_classes,
        **kwargs,
    )


def unlearn(
    model: nn.Module,
    original: dict,
    *,
    data: DeviceData,
    splits: Splits,
    num_classes: int,
    config: CamuConfig,
    seed: int,
    **kwargs,
) -> tuple[dict, dict]:
    """Runs CaMU from the frozen `original` (never modified); `unlearn_population` with one
    member. Returns `(variables, info)`."""
    ((out, info),) = unlearn_population(
        model,
        [original],
        data=data,
        splits=[splits],
        seeds=[seed],
        num_classes=num_classes,
        config=config,
        **kwargs,
    )
    return out, info
