"""The comparison a paper needs, from a notebook: original, retrain and unlearning methods on the
same runs, evaluated by the library, in one call.

`compare` runs the one study of the project (`camu_jax.study.run_study`, which the main job
`python -m experiments.unlearn` runs too): the originals (one per seed) and the retrained
models (one per run) as populations, each method as a population, every model scored
(`evaluation.evaluate`), the gaps to Retrain and the run-time efficiency. Nothing is written
to disk unless a `Store` is given (the main job adds a work dir, reports and plots). `table`
prints the mean and std over runs.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence

import numpy as np
from flax import linen as nn

from camu_jax import checks
from camu_jax import methods as registry
from camu_jax.data.pipeline import DeviceData
from camu_jax.data.splits import Splits
from camu_jax.methods.base import Method
from camu_jax.relearning import RelearnConfig

# The table of a comparison is the one results table (`camu_jax.results.table`).
from camu_jax.results import GAP_KEYS as GAP_KEYS
from camu_jax.results import TABLE_COLUMNS as TABLE_COLUMNS
from camu_jax.results import table as table
from camu_jax.study import Run, Store, run_study
from camu_jax.training import TrainConfig


def compare(
    model: nn.Module,
    *,
    train: DeviceData,
    test: DeviceData,
    splits: Sequence[Splits],
    seeds: Sequence[int],
    methods: Sequence[str | Method] = ("camu",),
    forget_classes: Sequence[tuple[int, ...] | None] | None = None,
    train_config: TrainConfig | None = None,
    num_classes: int | None = None,
    population_size: int | None = None,
    relearning: bool = False,
    progress: bool = False,
    store: Store | None = None,
    on_divergence: str = "record",
    eval_workers: int | None = None,
    record: bool = False,
    dataset: str | None = None,
) -> list[dict] | dict:
    """Runs original, retrain and `methods` (names of `camu_jax.methods`, or configs) on every
    run (`splits[i]`, `seeds[i]`): the study of the main job (`camu_jax.study.run_study`);
    returns per run `{'forget_class', 'seed', 'split_sizes', 'methods': {name: metrics}}`
    (and `'relearn': {name: curve}` with `relearning`), or with `record` the whole study
    record (runs, summary, phases, method configs).

    `forget_classes[i]` are run i's forgotten classes (class removal), or None (default: the
    classes D_f holds only where D_f is whole classes, else None); `train_config` the recipe of
    the original and retrained models (default the reference's, `TrainConfig()`); `store` a
    `camu_jax.study.Store` to checkpoint, resume and reuse models in (default: none, nothing
    is written). Metrics: `evaluation.score`'s, plus `avg_gap` (to Retrain over UA, RA, TA,
    MIA-efficacy), `seconds` and `rte`; a run whose method diverged has `diverged` instead
    (`on_divergence="record"`; "raise" stops). `dataset`: a method given by name gets that
    dataset's defaults (`camu_jax.methods.get(name, dataset=dataset)`; default None: the
    class defaults, the MNIST CNN's).
    """
    _check_runs(train=train, test=test, splits=splits, seeds=seeds, forget_classes=forget_classes)
    train_config = TrainConfig() if train_config is None else train_config
    labels = train.host_labels
    checks.check_splits(splits, train, data_name="train")
    if num_classes is not None:
        checks.check_labels(train, num_classes, name="train")
        checks.check_labels(test, num_classes, name="test")
    num_classes = num_classes or int(labels.max()) + 1
    checks.check_model_classes(model, ("train", train), ("test", test), num_classes=num_classes)
    if forget_classes is None:
        forget_classes = [_whole_classes(sp, labels) for sp in splits]
    configs = method_configs(methods, dataset)
    runs = [
        Run(seed, sp, None if classes is None else tuple(classes), f"run{i}-seed{seed}")
        for i, (seed, sp, classes) in enumerate(zip(seeds, splits, forget_classes, strict=True))
    ]
    out = run_study(
        model,
        train=train,
        test=test,
        runs=runs,
        methods=configs,
        train_config=train_config,
        num_classes=num_classes,
        relearning=_relearn_config(train_config) if relearning else None,
        population_size=population_size,
        eval_workers=eval_workers,
        on_divergence=on_divergence,
        store=store,
        progress=progress,
        log=None,
    )
    return out if record else out["runs"]


def method_configs(methods: Sequence, dataset: str | None = None) -> list:
    """`methods` with every name replaced by its default config for `dataset`
    (`camu_jax.methods.get(name, dataset=dataset)`); configs and lists of configs as given."""
    return [registry.get(m, dataset=dataset) if isinstance(m, str) else m for m in methods]


def _relearn_config(train_config: TrainConfig) -> RelearnConfig:
    """The relearning check of the paper: one epoch of the original's recipe."""
    return RelearnConfig(train=dataclasses.replace(train_config, epochs=1))


def _check_runs(*, train, test, splits, seeds, forget_classes) -> None:
    """Raises ValueError, naming the argument and its shape or value, before any training."""
    if len(seeds) == 0:
        raise ValueError("seeds=[]: compare needs at least one run (one seed per splits entry)")
    if len(splits) != len(seeds):
        raise ValueError(f"{len(splits)} splits but {len(seeds)} seeds: one seed per run")
    if forget_classes is not None and len(forget_classes) != len(seeds):
        raise ValueError(f"{len(forget_classes)} forget_classes but {len(seeds)} runs")
    for s in seeds:
        # numpy and scikit-learn (the attacks) take 32-bit seeds.
        if not isinstance(s, numbers.Integral) or isinstance(s, bool) or not 0 <= s < 2**32:
            raise ValueError(f"seeds {list(seeds)}: seed {s!r} is not an integer in 0..2**32-1")
    checks.check_image_sizes(train, test)


def _whole_classes(splits: Splits, labels: np.ndarray) -> tuple[int, ...] | None:
    """The classes D_f consists of, when it is exactly every item of them (class removal)."""
    classes = np.unique(labels[splits.forget])
    whole = np.flatnonzero(np.isin(labels, classes))
    return tuple(int(c) for c in classes) if np.array_equal(whole, splits.forget) else None
