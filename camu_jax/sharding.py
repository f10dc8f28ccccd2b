"""Data parallelism with `jax.jit` + `NamedSharding` over a one-axis `data` mesh.

This replaces `jax.pmap` (in maintenance mode and itself built on `jit` + `shard_map`): batches
are sharded along their leading axis over every device, parameters and optimizer states are
replicated, and XLA inserts the gradient all-reduce. This module is the only place that places
data on devices.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when the environment describes a multi-host job.

    Recognised: `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`), or
    `CAMU_DISTRIBUTED=1` for clusters JAX detects itself (SLURM, TPU pods, Open MPI).
    """
    if _initialized():
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("CAMU_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def _initialized() -> bool:
    try:
        return jax.distributed.is_initialized()
    except AttributeError:  # Older JAX without the query.
        return False


def make_mesh(devices: list | None = None) -> Mesh:
    """A `data` mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises unless the global batch splits evenly over the mesh's devices."""
    n = mesh.devices.size
    if batch_size <= 0 or batch_size % n:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {n} devices of the data mesh; "
            f"use a positive multiple of {n}"
        )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host arrays (identical on every process) -> arrays replicated over the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(
            np.shape(x), sharding, lambda idx: np.asarray(x)[idx]
        ),
        tree,
    )


def shard_batch(batch: Any, mesh: Mesh, axis: int = 0) -> Any:
    """Global host batch (identical on every process) -> arrays sharded along `axis`.

    Checks divisibility first so a bad batch size fails with a clear message, not an XLA error.
    """
    spec = P(*([None] * axis), DATA_AXIS)
    sharding = NamedSharding(mesh, spec)

    def put(x):
        x = np.asarray(x)
        check_batch_size(x.shape[axis], mesh)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, batch)


def constrain_batch(tree: Any, mesh: Mesh) -> Any:
    """Inside jit: mark the leading axis of each leaf as sharded over `data`."""
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(mesh)), tree)
