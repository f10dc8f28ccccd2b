"""Data and member parallelism with `jax.jit` + `NamedSharding` over a `(member, data)` mesh.

This replaces `jax.pmap` (in maintenance mode and itself built on `jit` + `shard_map`). A
population of runs (`camu_jax.engine`) stacks its members along a leading axis sharded over
`member`; each member's batch is sharded over `data`, its parameters and optimizer states are
replicated over `data`, and XLA inserts the gradient all-reduce. A mesh with one `member` row
is plain data parallelism. This module is the only place that places data on devices or
fetches it back.
"""

from __future__ import annotations

import functools
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

    Recognised: `JAX_COORDINATOR_ADDRESS` with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (one
    process per host, launched by hand or by a script; JAX itself reads only the address), or
    `CAMU_DISTRIBUTED=1` for clusters JAX detects itself (SLURM, TPU pods, Open MPI). CPU
    processes exchange data over gloo, which older JAX versions do not select by default.
    """
    if _initialized():
        return
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address and os.environ.get("CAMU_DISTRIBUTED") != "1":
        return
    kwargs = {}
    if address:
        kwargs["coordinator_address"] = address
        for key, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            text = os.environ.get(name)
            if text is None:
                continue  # JAX may still detect it (a cluster's environment)
            try:
                kwargs[key] = int(text)
            except ValueError:
                raise ValueError(f"{name}={text!r} is not an integer") from None
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


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


def needs_sync(mesh: Mesh) -> bool:
    """Whether a loop of calls over `mesh` must wait for each call before the next: on jax
    0.10.2, fake CPU devices (more than one on the CPU backend) can deadlock in a collective
    (XLA may insert one even without a data axis) unless every call is waited for."""
    return jax.default_backend() == "cpu" and mesh.devices.size > 1


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


def move_replicated(tree: Any, mesh: Mesh) -> Any:
    """Device arrays (on any mesh of this process) -> copies replicated over `mesh`: a phase
    placed on a sub-mesh (`engine.place`) takes its data there."""
    return jax.device_put(tree, replicated(mesh))


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


def member_owners(mesh: Mesh, members: int) -> list[int]:
    """For each member of a `members`-long member axis sharded over `mesh`, the lowest index
    of the processes that hold it: the one that computes its host-side metrics."""
    check_members(members, mesh)
    per_row = members // member_devices(mesh)
    rows = [min(d.process_index for d in row) for row in np.asarray(mesh.devices)]
    return [rows[j // per_row] for j in range(members)]


@functools.lru_cache(maxsize=8)
def _whole_members(mesh: Mesh):
    # One jitted function per mesh, so that each shape compiles once per process.
    return jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P(MEMBER_AXIS)))


def owned_members(x: jax.Array, mesh: Mesh) -> dict[int, np.ndarray]:
    """`{member: host value}` of the members of `x` (leading member axis) this process owns
    (`member_owners`), without moving any other member's data between processes. A collective:
    every process calls it."""
    # Whole members on every device of their mesh row (a no-op without a data axis).
    x = _whole_members(mesh)(x)
    owners, me, out = member_owners(mesh, x.shape[0]), jax.process_index(), {}
    for shard in x.addressable_shards:
        lo = shard.index[0].start or 0
        data = None
        for k in range(shard.data.shape[0]):
            if owners[lo + k] == me and lo + k not in out:
                data = np.asarray(shard.data) if data is None else data
                out[lo + k] = data[k]
    return out


def gather_rows(rows: dict[int, np.ndarray], owners: list[int], width: int) -> np.ndarray:
    """Per-member float64 vectors of length `width` (each process passes those of the members
    it owns) -> `[members, width]` on every process, bit for bit (sent as uint32 words: JAX
    without x64 would round float64). A collective: every process calls it."""
    local = np.full((len(owners), width), np.nan)
    for i, row in rows.items():
        local[i] = np.asarray(row, np.float64)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    words = multihost_utils.process_allgather(local.view(np.uint32))  # [processes, members, 2w]
    everyone = np.asarray(words).view(np.float64)
    return everyone[np.asarray(owners, int), np.arange(len(owners))]


def from_process_zero(values: np.ndarray) -> np.ndarray:
    """Process 0's `values` (a host array of one shape on every process), on every process:
    for decisions that must not differ between processes, such as those taken from a clock.
    A collective: every process calls it."""
    if jax.process_count() == 1:
        return np.asarray(values)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(values)))


def agree(values: np.ndarray, what: str, hint: str) -> None:
    """Raises ValueError (on every process) unless every process passes the same int
    `values`; `what` names them, `hint` says what to fix. A collective: every process calls
    it."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    local = np.asarray(values, np.int32)
    seen = np.asarray(multihost_utils.process_allgather(local))
    if (seen != local[None]).any():
        found = "; ".join(f"process {p}: {seen[p].tolist()}" for p in range(len(seen)))
        raise ValueError(f"the processes disagree on {what} ({found}); {hint}")


def constrain_members(tree: Any, mesh: Mesh) -> Any:
    """Inside jit: mark the leading (member) axis of each leaf as sharded over `member`."""
    spec = NamedSharding(mesh, P(MEMBER_AXIS))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), tree)


def constrain_batch(tree: Any, mesh: Mesh) -> Any:
    """Inside jit: mark the leading axis of each leaf as sharded over `data` (nothing to mark
    on a mesh with one data device, where the step may run inside `vmap_members`' shard_map)."""
    if data_devices(mesh) == 1:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(mesh)), tree)


def vmap_members(fn, mesh: Mesh, in_axes: tuple) -> Any:
    """`fn` mapped over the leading member axis of the arguments whose `in_axes` entry is 0
    (the others, `None`, are shared by every member); the outputs carry the member axis.

    On a mesh with several member devices and one data device, each device vmaps its own
    members inside `jax.shard_map`: a member's convolutions stay its own, with no
    communication. Left to XLA's SPMD partitioner, the vmapped (grouped) convolutions of the
    members are partitioned with all-gathers between the devices: 10x slower on the MNIST CNN
    over two CPU devices (docs/benchmarks.md, placement). With a data axis the partitioner
    shards each member's batch and inserts the gradient all-reduce (`spmd_axis_name`).
    """
    if member_devices(mesh) == 1 or data_devices(mesh) > 1:
        return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=MEMBER_AXIS)
    local = jax.vmap(fn, in_axes=in_axes)
    specs = tuple(P(MEMBER_AXIS) if a == 0 else P() for a in in_axes)
    return jax.shard_map(
        local, mesh=mesh, in_specs=specs, out_specs=P(MEMBER_AXIS), check_vma=False
    )
