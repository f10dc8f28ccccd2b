"""Supervised training (original model, retrain-from-scratch, relearning) on the wave runner.

A population of trainings (one member per seed or per forget set) runs as one compiled program
(`camu_jax.runner` on `camu_jax.engine`); `train_model` is a population of one. Data stay on
device as uint8; the host only sends `[members, steps, batch]` index plans. Losses and the
state are checked for non-finite values after every chunk (before anything is saved), and each
member is checkpointed at epoch ends, so an interrupted run resumes where its last saved epoch
ended, bit-identically: an epoch's plan depends only on (seed, epoch).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from camu_jax import checks, engine, runner, sharding
from camu_jax import keys as host_keys
from camu_jax.data.pipeline import (
    DeviceData,
    InputSpec,
    item_keys,
    preprocess,
    shuffled_batches,
)
from camu_jax.models import state_variables
from camu_jax.steps import adam_l2, check_number, init_train_state, train_step


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The reference's recipe for the original and the retrained model (`train.py: train`):
    Adam with coupled weight decay, cross-entropy, shuffled batches."""

    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4

    def validate(self) -> None:
        """Raises ValueError naming the first bad value."""
        for name in ("epochs", "batch_size"):
            check_number(name, getattr(self, name), integer=True)
        check_number("learning_rate", self.learning_rate)
        check_number("weight_decay", self.weight_decay, positive=False)


def train_program(model: nn.Module, tx, spec: InputSpec, mesh: Mesh) -> engine.Program:
    """Cross-entropy steps: member data `{'items' [n], 'key'}`, plan rows `{'ids', 'mask'}`;
    batch j uses items `items[ids[j]]`."""

    def make_batch(state, shared, member, row):
        images, labels = shared
        rows = member["items"][row["ids"]]
        keys = None
        if spec.augment:
            key = jax.random.fold_in(jax.random.wrap_key_data(member["key"]), state.step)
            keys = item_keys(key, row["ids"])
        batch = {
            "image": preprocess(images[rows], spec, augment_keys=keys),
            "label": labels[rows],
            "mask": row["mask"],
        }
        return sharding.constrain_batch(batch, mesh)

    return engine.Program(
        init=functools.partial(init_train_state, tx=tx),
        step=functools.partial(train_step, model=model, tx=tx),
        make_batch=make_batch,
    )


def _stage(model, config: TrainConfig, spec: InputSpec, plan=None, chunk: int = 1) -> runner.Stage:
    tx = adam_l2(config.learning_rate, config.weight_decay)
    return runner.Stage(
        name="train",
        key=("train", model, config.learning_rate, config.weight_decay, spec),
        program=lambda mesh: train_program(model, tx, spec, mesh),
        plan=plan,
        epochs=config.epochs,
        chunk=chunk,
        learning_rates=lambda i, epoch: {"learning_rate": config.learning_rate},
    )


def train_engine(
    model: nn.Module, config: TrainConfig, spec: InputSpec, mesh: Mesh, use_scan=None
) -> engine.Engine:
    """The engine `train_population` runs `config` with on `mesh` (for compile-once tests)."""
    return runner.engine_for(_stage(model, config, spec), mesh, use_scan)


def epoch_plan(n_items: int, batch_size: int, seed: int, epoch: int) -> engine.Plan:
    """One epoch of a shuffled `DataLoader(batch_size)` over `n_items` items: `ids`, `mask`
    `[steps, batch]`; a fixed function of (seed, epoch), so a resumed run is bit-identical."""
    ids, mask = shuffled_batches(n_items, batch_size, np.random.default_rng([seed, 3, epoch]))
    return {"ids": ids, "mask": mask}


def _member_key(seed: int) -> np.ndarray:
    return host_keys.key_data(seed)


def train_population(
    model: nn.Module,
    variables: Sequence[dict],
    *,
    data: DeviceData,
    items: Sequence[np.ndarray],
    seeds: Sequence[int],
    config: TrainConfig,
    names: Sequence[str] | None = None,
    checkpoint_dirs: Sequence[str | Path | None] | None = None,
    metas: Sequence[dict] | None = None,
    population_size: int | None = None,
    checkpoint_every: float = 60.0,
    chunk_steps: int = 250,
    callback: Callable[[dict, np.ndarray, list[int]], None] | None = None,
    use_scan: bool | None = None,
    progress: bool = True,
    desc: str = "train",
    on_divergence: str = "raise",
    compile_only: bool = False,
) -> list[tuple[dict | None, dict]] | dict:
    """Trains every member (initial `variables[i]`, items `items[i]`, seed `seeds[i]`) with
    `config`, at most `population_size` members at a time (default: the layout `engine.place`
    chooses for the phase), on the one wave runner (`camu_jax.runner`).

    Args:
      data: the training split on device.
      items: per member, `[n_i]` indices of the items to train on (D, or D_r).
      checkpoint_dirs: per member, where to save its `TrainState` and resume from (None: no
        checkpoint); `metas[i]` is the JSON identity stored with it and checked on restore.
        A member is saved at the end of an epoch when `checkpoint_every` seconds have passed
        since its last save, and always after its last epoch.
      callback: `callback(stacked_variables, done, members)` after every chunk: `done[j]` is
        how many steps of its epoch member `members[j]` of the wave has run (records every
        `chunk_steps` steps, e.g. the relearning curves).
      on_divergence: a member whose loss or parameters turn non-finite raises
        FloatingPointError naming it ("raise"), or gets `variables=None` and the message as
        `info["diverged"]` while the others go on unchanged ("record").
      compile_only: compile the phase's programs and return what was compiled, without
        running (`runner.compile_ahead`; `variables` may be stand-ins of the right shapes).

    Returns per member `(variables, info)` (`runner.run`'s info: `epochs_run`,
    `resumed_from`, `losses`, `epochs` (per-epoch means), `seconds`, `run_seconds`,
    `compile_seconds`...); `seconds` is the member's measured share of the phase's time
    (`camu_jax.runner`: its compile share plus its run share; earlier sessions' included).
    Inside `camu_jax.logs.log_to(root)` every member's per-step loss and learning rate go to
    `<root>/<desc>/<member>/` (TensorBoard events and `train.csv`). A finished member is
    restored without training.
    """
    config.validate()
    checks.check_items(items, data)
    checks.check_model_classes(model, ("data", data))
    sharding.check_batch_size(config.batch_size, data.mesh)
    members = runner.members(
        desc, variables, names, checkpoint_dirs, metas, items=items, seeds=seeds
    )
    for m, it in zip(members, items, strict=True):
        if len(it) == 0:
            raise ValueError(f"{m.name}: cannot train on an empty set of items")
    items = [np.asarray(it) for it in items]
    b = config.batch_size
    # Plans index a full-length item table, so training on D and on D_r share one compile.
    width = max(data.size, *(len(it) for it in items))

    def member_data(indices, placed):
        tables = np.zeros((len(indices), width), np.int32)
        for j, i in enumerate(indices):
            tables[j, : len(items[i])] = items[i]
        keys = np.stack([_member_key(seeds[i]) for i in indices])
        return sharding.shard_members({"items": tables, "key": keys}, placed.mesh)

    stage = _stage(
        model,
        config,
        data.spec,
        plan=lambda i, epoch: epoch_plan(len(items[i]), b, seeds[i], epoch),
        chunk=max(1, min(chunk_steps, -(-width // b))),
    )
    phase = runner.Phase(
        name=desc,
        stages=(stage,),
        member_data=member_data,
        variables=state_variables,
        on_chunk=callback,
        checkpoint_every=checkpoint_every,
        on_divergence=on_divergence,
        use_scan=use_scan,
        progress=progress,
    )
    if compile_only:
        return runner.compile_ahead(phase, members, data, population_size=population_size)
    return runner.run(phase, members, data, population_size=population_size)


def train_model(
    model: nn.Module,
    variables: dict,
    *,
    data: DeviceData,
    items: np.ndarray,
    config: TrainConfig,
    seed: int,
    checkpoint_dir: str | Path | None = None,
    meta: dict | None = None,
    **kwargs,
) -> tuple[dict, dict]:
    """`train_population` with one member: returns `(variables, info)`."""
    ((out, info),) = train_population(
        model,
        [variables],
        data=data,
        items=[items],
        seeds=[seed],
        config=config,
        checkpoint_dirs=[checkpoint_dir],
        metas=[meta],
        **kwargs,
    )
    return out, info
