"""A thin Orbax wrapper: save, restore against an abstract target, restore-or-init.

Each checkpoint directory holds an Orbax `CheckpointManager` whose steps are epochs; every
step stores the state pytree (`StandardSave`) and a JSON `meta` item that names what the state
is (model, classes, input shape, training settings, ...) and holds a sha256 digest of the
state's bytes. Orbax writes a step under a temporary name and renames it only when complete, so
an interrupted save never shows up as a restorable step. A restore checks the meta, then
shapes/dtypes, then the digest: Orbax stores arrays uncompressed and without checksums, so a
flipped bit on disk would otherwise come back as a silently different model. Every refusal
names the directory (or step folder) to delete; nothing is deleted here.

Across processes (`jax.distributed`), process 0 writes every checkpoint (from host arrays,
which every process has gathered; Orbax writes host numpy arrays from process 0 only) and any
process reads them: every manager here is local to its process (Orbax's `active_processes` is
this process alone), so no Orbax barrier waits on processes that do not save. The directory
must then be on a filesystem all hosts share.

`lock_directory` gives one process at a time a directory to write into (a work dir, a model's
checkpoint directory); `save_next` takes it itself.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

DIGEST_KEY = "state_sha256"


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not describe the state that was asked for."""


class CheckpointCorruptError(CheckpointMismatchError):
    """The checkpoint on disk is damaged: unreadable, incomplete, or not the bytes saved."""


def _manager(directory: str | Path, *, max_to_keep: int | None = 2) -> ocp.CheckpointManager:
    me = jax.process_index()
    # This process alone, as primary host: no barrier with processes that do not take part
    # (only process 0 writes; any process reads).
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    # Orbax creates the directory only with a barrier over all processes.
    Path(directory).absolute().mkdir(parents=True, exist_ok=True)
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=False,
            enable_async_checkpointing=False,
            multiprocessing_options=alone,
        ),
        # The handlers too: each takes the primary host from its own options.
        item_handlers={
            "state": ocp.StandardCheckpointHandler(multiprocessing_options=alone),
            "meta": ocp.JsonCheckpointHandler(multiprocessing_options=alone),
        },
    )


def _host(leaf: Any) -> np.ndarray:
    if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
        return np.asarray(jax.device_get(leaf))
    if leaf.sharding.is_fully_replicated:  # its local shard is the whole value
        return np.asarray(leaf.addressable_data(0))
    # Gathering here would be a collective that only process 0 (the writer) reaches.
    raise ValueError(
        "a checkpointed array is sharded over other processes; gather it first on every "
        "process (camu_jax.sharding.fetch)"
    )


def state_digest(state: Any) -> str:
    """sha256 over every leaf's dtype, shape and bytes, in tree order."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        x = np.ascontiguousarray(_host(leaf))
        h.update(f"{x.dtype}{x.shape};".encode())
        h.update(x.reshape(-1).view(np.uint8))
    return h.hexdigest()


def latest_step(directory: str | Path) -> int | None:
    """The newest complete step in `directory`, or None when there is none."""
    if not Path(directory).exists():
        return None
    with _manager(directory) as mngr:
        return mngr.latest_step()


def save(directory: str | Path, step: int, state: Any, meta: dict) -> None:
    """Saves `state` (host arrays) and its JSON description `meta` (plus the state's digest)
    as `step`; blocks until durable. Only process 0 writes; the others return at once."""
    if jax.process_index() != 0:
        return
    meta = {**meta, DIGEST_KEY: state_digest(state)}
    with _manager(directory) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        mngr.wait_until_finished()


def save_next(directory: str | Path, state: Any, meta: dict) -> int | None:
    """Saves as the step after the latest one; returns it (None on processes other than 0,
    which write nothing). The previous step stays until the new one is complete
    (`max_to_keep=2`), so a re-run replaces a result without a window in which neither
    exists."""
    if jax.process_index() != 0:
        return None
    # Another process saving into `directory` would pick the same step.
    with lock_directory(directory, wait=True):
        latest = latest_step(directory)
        step = 0 if latest is None else latest + 1
        save(directory, step, state, meta)
    return step


def _corrupt(directory: str | Path, step: int, problem: str) -> CheckpointCorruptError:
    step_dir = Path(directory).absolute() / str(step)
    return CheckpointCorruptError(
        f"checkpoint {step_dir} {problem}; delete that folder to resume from an earlier step "
        "or retrain"
    )


def _latest(mngr: ocp.CheckpointManager, directory: str | Path, step: int | None) -> int:
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    return step


def _read_meta(mngr: ocp.CheckpointManager, directory: str | Path, step: int) -> dict:
    # An empty or hand-made step folder, a missing item and a truncated JSON file all surface
    # here as KeyError/JSONDecodeError/... without the path.
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        raise _corrupt(directory, step, f"has no readable meta ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise _corrupt(directory, step, f"has a meta that is not a JSON object: {meta!r}")
    return dict(meta)


def read_meta(directory: str | Path, step: int | None = None) -> dict:
    with _manager(directory) as mngr:
        return _read_meta(mngr, directory, _latest(mngr, directory, step))


def check_meta(found: dict, expected: dict, directory: str | Path) -> None:
    """Raises `CheckpointMismatchError` naming every key whose value differs."""
    diffs = [
        f"{k}: checkpoint has {found.get(k)!r}, expected {v!r}"
        for k, v in expected.items()
        if found.get(k) != v
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {directory} does not match the requested model ({'; '.join(diffs)}); "
            "delete it or use another --workdir"
        )


def restore(
    directory: str | Path, *, abstract_state: Any, expected_meta: dict, step: int | None = None
) -> tuple[int, Any, dict]:
    """Restores `(step, state, meta)`; checks `meta`, shapes/dtypes/shardings and the digest.

    Args:
      directory: checkpoint directory.
      abstract_state: `jax.eval_shape` of the state (with `.sharding` where it matters).
      expected_meta: keys the stored meta must equal (model name, classes, input shape...).
      step: which step; default the latest.

    Raises `CheckpointMismatchError` when the checkpoint describes another state, and its
    subclass `CheckpointCorruptError` when it is unreadable or its bytes changed since saving.
    """
    with _manager(directory) as mngr:
        step = _latest(mngr, directory, step)
        meta = _read_meta(mngr, directory, step)
        check_meta(meta, expected_meta, directory)
        if DIGEST_KEY not in meta:
            raise CheckpointMismatchError(
                f"checkpoint {directory} has no state digest (written by an older camu-jax), "
                "so it cannot be verified; delete it to retrain"
            )
        try:
            restored = mngr.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except Exception as e:  # Orbax/TensorStore raise many types for unreadable data.
            raise CheckpointMismatchError(
                f"checkpoint {directory} step {step} cannot be restored as the requested state "
                f"(corrupt, or a different structure/shape): {type(e).__name__}: {e}; "
                "delete it to retrain"
            ) from e
    state = restored["state"]
    _check_shapes(state, abstract_state, directory)
    if state_digest(state) != meta[DIGEST_KEY]:
        raise _corrupt(directory, step, "holds arrays whose bytes differ from those saved")
    return step, state, meta


def _check_shapes(state: Any, abstract_state: Any, directory: str | Path) -> None:
    got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), state)
    want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), abstract_state)
    if got != want:
        raise CheckpointMismatchError(
            f"checkpoint {directory} holds arrays of other shapes/dtypes than requested"
        )


def abstract_like(state: Any, sharding: Any | None = None) -> Any:
    """Abstract target of `state` (optionally with one sharding for every leaf)."""

    def leaf(x):
        s = sharding if sharding is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(leaf, state)


LOCK_FILE = ".lock"


class DirectoryInUseError(ValueError):
    """Another process holds the lock of the directory (`lock_directory`)."""


class DirectoryLock:
    """A held `lock_directory` lock: `release()` or leaving its `with` block frees it."""

    def __init__(self, directory: Path, fd: int):
        self.directory, self._fd = directory, fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # names no holder once free
        finally:
            os.close(fd)  # closing the file releases the flock

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_directory(
    directory: str | Path,
    *,
    wait: bool = False,
    on_wait: Callable[[str], None] | None = print,
) -> DirectoryLock:
    """Takes the exclusive lock of `directory` (created if missing): one writer at a time.

    The lock is an `fcntl.flock` on `<directory>/.lock`, which holds the holder's pid, host and
    command. When another process holds it, `wait=False` raises `DirectoryInUseError` naming
    that process; `wait=True` passes `on_wait` one line saying whom it waits for, then blocks
    until the lock is free. The operating system releases the lock when its holder exits or is
    killed, however; a lock is per open file, so a second `lock_directory` of the same
    directory in one process waits for the first like any other.

    Returns the held `DirectoryLock` (a context manager).
    """
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        holder = _holder_unless_locked(fd)
        if holder is not None:
            if not wait:
                raise DirectoryInUseError(
                    f"{directory} is in use by another process, {holder}; wait for it to end "
                    f"or use another directory (lock file {path})"
                )
            if on_wait is not None:
                on_wait(f"waiting for {directory}: {holder} is writing into it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return DirectoryLock(directory, fd)


def _holder_unless_locked(fd: int) -> str | None:
    """Locks `fd` and returns None, or describes the process that holds it. A holder writes
    its name just after locking, so an empty file is read again for a moment."""
    for _ in range(40):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            pass
        text = os.pread(fd, 65536, 0).decode(errors="replace")
        try:
            who = json.loads(text)
            return f"pid {who['pid']} on {who['host']} ({who['command']})"
        except (ValueError, TypeError, KeyError):
            time.sleep(0.025)
    return "a process that did not say which"
