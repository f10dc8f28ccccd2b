"""A thin Orbax wrapper: save, restore against an abstract target, restore-or-init.

Each checkpoint directory holds an Orbax `CheckpointManager` whose steps are epochs; every
step stores the state pytree (`StandardSave`) and a JSON `meta` item that names what the state
is (model, classes, input shape, ...). Orbax writes a step under a temporary name and renames it
only when complete, so an interrupted save never shows up as a restorable step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not describe the state that was asked for."""


def _manager(directory: str | Path, *, max_to_keep: int | None = 2) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        ),
        item_names=("state", "meta"),
    )


def latest_step(directory: str | Path) -> int | None:
    """The newest complete step in `directory`, or None when there is none."""
    if not Path(directory).exists():
        return None
    with _manager(directory) as mngr:
        return mngr.latest_step()


def save(directory: str | Path, step: int, state: Any, meta: dict) -> None:
    """Saves `state` and its JSON description `meta` as `step`; blocks until durable."""
    with _manager(directory) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
            ),
            force=True,
        )
        mngr.wait_until_finished()


def save_next(directory: str | Path, state: Any, meta: dict) -> int:
    """Saves as the step after the latest one; returns it. The previous step stays until the
    new one is complete (`max_to_keep=2`), so a re-run replaces a result without a window in
    which neither exists."""
    latest = latest_step(directory)
    step = 0 if latest is None else latest + 1
    save(directory, step, state, meta)
    return step


def read_meta(directory: str | Path, step: int | None = None) -> dict:
    with _manager(directory) as mngr:
        step = mngr.latest_step() if step is None else step
        restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])


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
    """Restores `(step, state, meta)`; checks `meta` and then shapes/dtypes/shardings.

    Args:
      directory: checkpoint directory.
      abstract_state: `jax.eval_shape` of the state (with `.sharding` where it matters).
      expected_meta: keys the stored meta must equal (model name, classes, input shape...).
      step: which step; default the latest.
    """
    with _manager(directory) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {directory}")
        meta = dict(
            mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        )
        check_meta(meta, expected_meta, directory)
        try:
            restored = mngr.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except Exception as e:  # Orbax/TensorStore raise many types for unreadable data.
            raise CheckpointMismatchError(
                f"checkpoint {directory} step {step} cannot be restored as the requested state "
                f"(corrupt, or a different structure/shape): {type(e).__name__}: {e}"
            ) from e
    state = restored["state"]
    _check_shapes(state, abstract_state, directory)
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
