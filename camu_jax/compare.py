"""The comparison a paper needs, from a notebook: original, retrain and unlearning methods on the
same runs, evaluated by the library, in one call.

`compare` runs the one study of the project (`camu_jax.study.run_study`, which the main job
`python -m experiments.unlearn` runs too): the originals (one per seed; trained, or the
caller's) and the retrained models (one per run) as populations, each method as a population
(a plain function, `camu_jax.methods.from_function`, run by run), every model scored
(`evaluation.evaluate`), the gaps to Retrain and the run-time efficiency. It returns the
metrics and every model it made (`Comparison.models`). Nothing is written to disk unless a
`Store` is given (the main job adds a work dir, reports and plots). `table` prints the mean and
std over runs.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn

from camu_jax import checkpointing, checks
from camu_jax import methods as registry
from camu_jax.data.pipeline import DeviceData
from camu_jax.data.splits import Splits
from camu_jax.methods.base import Method
from camu_jax.models import init_variables
from camu_jax.relearning import RelearnConfig

# The table of a comparison is the one results table (`camu_jax.results.table`).
from camu_jax.results import GAP_KEYS as GAP_KEYS
from camu_jax.results import TABLE_COLUMNS as TABLE_COLUMNS
from camu_jax.results import table as table
from camu_jax.study import Run, Store, point_labels, run_study
from camu_jax.training import TrainConfig


class Comparison(list):
    """What `compare` returns: the list of runs (what `table` prints), with `models`, every
    model the comparison made or was given: `{'original' | 'retrain' | row label: [variables
    per run]}` (host arrays, `{'params', 'batch_stats'}`; None where a method diverged), and
    `record`, the study's whole record (runs, summary, phases, method configs; JSON)."""

    models: dict[str, list[dict | None]]
    record: dict


class Record(dict):
    """What `compare(..., record=True)` returns: the study's record (JSON, as results.json's),
    with the models as `models` (as `Comparison.models`)."""

    models: dict[str, list[dict | None]]


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
    originals: Mapping[int, dict] | Sequence[dict] | None = None,
) -> Comparison | Record:
    """Runs original, retrain and `methods` (names of `camu_jax.methods`, configs, lists of
    configs, or `camu_jax.methods.from_function` methods) on every run (`splits[i]`,
    `seeds[i]`): the study of the main job (`camu_jax.study.run_study`); returns a
    `Comparison`: per run `{'forget_class', 'seed', 'split_sizes', 'methods': {row: metrics}}`
    (and `'relearn': {row: curve}` with `relearning`), with every model as `.models` and the
    whole record as `.record`; with `record`, that record (runs, summary, phases, method
    configs) as a `Record`, the models as its `.models`.

    Rows: one per config. A method given once is named by its name (`ga`); several configs of
    one method (wherever they stand in `methods`) are one row each, named by the settings in
    which they differ, as a sweep's points (`ga[learning_rate=0.001]`,
    `ga[learning_rate=0.01]`: `camu_jax.study.point_labels`); the same settings twice are
    refused (ValueError).

    `originals`: the trained original models to unlearn from, instead of training them:
    `{seed: variables}` with one entry per seed of `seeds`, or a list with one per run (runs
    of one seed then hold the same variables); variables `{'params', 'batch_stats'}` (the
    latter may be left out for a model without BatchNorm) of the shapes and dtypes
    `init_variables(model, ...)` gives, checked before anything runs (a ValueError names the
    seed and the first leaf missing, extra, of another shape or dtype, or not finite). No
    original phase runs then; the original rows are these models' scores, with `seconds`
    None.

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
    if originals is not None:
        originals = check_originals(model, originals, seeds, train.input_shape)
    if forget_classes is None:
        forget_classes = [_whole_classes(sp, labels) for sp in splits]
    configs = rows(method_configs(methods, dataset))
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
        originals=originals,
        return_models=True,
    )
    models = out.pop("models")
    if record:
        result = Record(out)
        result.models = models
        return result
    runs_out = Comparison(out["runs"])
    runs_out.models, runs_out.record = models, out
    return runs_out


def method_configs(methods: Sequence, dataset: str | None = None) -> list:
    """`methods` with every name replaced by its default config for `dataset`
    (`camu_jax.methods.get(name, dataset=dataset)`); configs and lists of configs as given."""
    return [registry.get(m, dataset=dataset) if isinstance(m, str) else m for m in methods]


def rows(configs: Sequence) -> list[Method | list[Method]]:
    """`configs` (configs and lists of configs) as the study's method groups: every config of
    one method (by name) in one group, in order of first appearance, a group of several being
    one row per config (`point_labels`). Raises ValueError for two configs with the same
    settings, or two kinds of config under one name."""
    groups: dict[str, list[Method]] = {}
    for entry in configs:
        for c in [entry] if isinstance(entry, Method) else list(entry):
            if not isinstance(c, Method):
                raise TypeError(f"methods: {c!r} is not a method name or config")
            group = groups.setdefault(c.name, [])
            if group and type(group[0]) is not type(c):
                raise ValueError(
                    f"methods: {c.name!r} names a {type(group[0]).__name__} and a "
                    f"{type(c).__name__}; give them different names"
                )
            group.append(c)
    for name, group in groups.items():
        settings = [repr(dataclasses.asdict(c)) for c in group]
        if twice := [i for i, s in enumerate(settings) if settings.index(s) != i]:
            raise ValueError(
                f"methods: {name} is given {len(group)} times and config {twice[0] + 1} of them "
                "repeats an earlier one's settings; each config of a method is one row, so give "
                "each other settings (or drop the repeat)"
            )
        point_labels(group)  # the row names: refuses what they cannot tell apart
    return [g[0] if len(g) == 1 else g for g in groups.values()]


def check_originals(
    model: nn.Module,
    originals: Mapping[int, dict] | Sequence[dict],
    seeds: Sequence[int],
    input_shape: tuple[int, ...],
) -> dict[int, dict]:
    """`{seed: variables}` (host arrays) of the originals given for `seeds`, checked against
    `model` (ValueError naming the seed and the leaf)."""
    seeds = [int(s) for s in seeds]
    if isinstance(originals, Mapping):
        if all(isinstance(k, str) for k in originals):
            raise ValueError(
                f"originals has keys {sorted(originals)}: give {{seed: variables}} (one model "
                "per seed) or a list of variables, one per run"
            )
        given = {int(k): v for k, v in originals.items()}
        if missing := sorted(set(seeds) - set(given)):
            raise ValueError(f"originals has no model for seeds {missing} (it has {sorted(given)})")
        if extra := sorted(set(given) - set(seeds)):
            raise ValueError(f"originals has models for seeds {extra}, which no run has")
    else:
        originals = list(originals)
        if len(originals) != len(seeds):
            raise ValueError(
                f"{len(originals)} originals for {len(seeds)} runs: one per run (or a "
                "{seed: variables} mapping)"
            )
        given = {}
        for seed, v in zip(seeds, originals, strict=True):
            given.setdefault(seed, v)
    expected = jax.eval_shape(
        lambda k: init_variables(model, k, input_shape), jax.ShapeDtypeStruct((2,), np.uint32)
    )
    out = {
        seed: _check_variables(given[seed], expected, f"originals[seed {seed}]") for seed in given
    }
    if not isinstance(originals, Mapping):
        for i, (seed, v) in enumerate(zip(seeds, originals, strict=True)):
            if v is not given[seed] and checkpointing.state_digest(
                _check_variables(v, expected, f"originals[{i}]")
            ) != checkpointing.state_digest(out[seed]):
                raise ValueError(
                    f"originals[{i}] (seed {seed}) differs from the original of an earlier run "
                    "of that seed: the runs of one seed unlearn from one original"
                )
    return out


def _check_variables(variables, expected: dict, where: str) -> dict:
    """`variables` as host arrays with `expected`'s structure, or a ValueError naming the first
    difference."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(
            f"{where}: expected the model's variables {{'params', 'batch_stats'}}, got "
            f"{type(variables).__name__}"
            + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else "")
        )
    if extra := sorted(set(variables) - {"params", "batch_stats"}):
        raise ValueError(f"{where}: collections {extra} are not the model's (params, batch_stats)")
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    want = {
        jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]
    }
    got = {
        jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]
    }
    if missing := [k for k in want if k not in got]:
        raise ValueError(
            f"{where}: missing {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            + " of the model's variables"
        )
    if extra := [k for k in got if k not in want]:
        raise ValueError(f"{where}: {', '.join(extra[:5])} is not in the model's variables")
    for k, ref in want.items():
        x = got[k]
        shape, dtype = np.shape(x), getattr(x, "dtype", np.asarray(x).dtype)
        if tuple(shape) != tuple(ref.shape):
            raise ValueError(f"{where}: {k} has shape {tuple(shape)}, the model's is {ref.shape}")
        if np.dtype(dtype) != np.dtype(ref.dtype):
            raise ValueError(
                f"{where}: {k} is {np.dtype(dtype)}, the model's is {np.dtype(ref.dtype)} (cast it)"
            )
    leaves = [np.asarray(got[k]) for k in want]
    for k, x in zip(want, leaves, strict=True):
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise ValueError(f"{where}: {k} holds NaN or inf")
    return jax.tree.unflatten(jax.tree.structure(expected), leaves)


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
