"""Data and member parallelism with `jax.jit` + `NamedSharding` over a `(member, data)` mesh.

This replaces `jax.pmap` (in maintenance mode and itself built on `jit` + `shard_map`). A
population of runs (`camu_jax.engine`) stacks its members along a leading axis sharded over
`member`; each member's batch is sharded over `data`, its parameters and optimizer states are
replicated over `data`, and XLA inserts the gradient all-reduce. A mesh with one `member` row
is plain data parallelism. This module is the only place that places data on devices or
fetches it back.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
MEMBER_AXIS = "member"


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


def make_mesh(devices: list | None = None, *, member_devices: int = 1) -> Mesh:
    """A `(member, data)` mesh over `devices` (default: every device of every process):
    `member_devices` rows of members, the rest of the devices sharding each member's batch."""
    devices = jax.devices() if devices is None else list(devices)
    if member_devices < 1 or len(devices) % member_devices:
        raise ValueError(
            f"{member_devices} member devices do not divide the {len(devices)} devices"
        )
    grid = np.asarray(devices).reshape(member_devices, len(devices) // member_devices)
    return Mesh(grid, (MEMBER_AXIS, DATA_AXIS))


def member_devices(mesh: Mesh) -> int:
    return mesh.shape.get(MEMBER_AXIS, 1)


def data_devices(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises unless the global batch splits evenly over the mesh's `data` devices."""
    n = data_devices(mesh)
    if batch_size <= 0 or batch_size % n:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {n} devices of the data mesh; "
            f"use a positive multiple of {n}"
        )


def check_members(members: int, mesh: Mesh) -> None:
    """Raises unless a wave of `members` splits evenly over the mesh's `member` devices."""
    n = member_devices(mesh)
    if members <= 0 or members % n:
        raise ValueError(
            f"population size {members} is not divisible by the {n} member devices of the "
            f"mesh; use a positive multiple of {n}"
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


def shard_members(
    tree: Any, mesh: Mesh, *, axis: int = 0, batch: bool = False, batch_axis: int | None = None
) -> Any:
    """Host arrays with a member axis at `axis` (identical on every process) -> global arrays
    sharded over `member` there (and over `data` on `batch_axis`, default the next axis, when
    `batch`); each process builds only the shards it holds."""
    batch_axis = axis + 1 if batch_axis is None else batch_axis
    spec = [None] * (max(axis, batch_axis if batch else axis) + 1)
    spec[axis] = MEMBER_AXIS
    if batch:
        spec[batch_axis] = DATA_AXIS
    sharding = NamedSharding(mesh, P(*spec))

    def put(x):
        x = np.asarray(x)
        check_members(x.shape[axis], mesh)
        if batch:
            check_batch_size(x.shape[batch_axis], mesh)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def free_memory(mesh: Mesh) -> int:
    """Free bytes of the most used local device of `mesh` (accelerators report it); on a CPU
    the host's available memory shared by its local devices."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    stats = [d.memory_stats() for d in local]
    if all(s and "bytes_limit" in s for s in stats):
        return min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # pragma: no cover - not Linux
        available = 8 * 2**30
    return available // max(1, len(local))


def fetch(tree: Any) -> Any:
    """Device arrays -> host numpy, gathering shards other processes hold (every process gets
    the whole value)."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def constrain_members(tree: Any, mesh: Mesh) -> Any:
    """Inside jit: mark the leading (member) axis of each leaf as sharded over `member`."""
    spec = NamedSharding(mesh, P(MEMBER_AXIS))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), tree)


def constrain_batch(tree: Any, mesh: Mesh) -> Any:
    """Inside jit: mark the leading axis of each leaf as sharded over `data`."""
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(mesh)), tree)
