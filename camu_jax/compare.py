"""The comparison a paper needs, from a notebook: original, retrain and unlearning methods on the
same runs, evaluated by the library, in one call.

`compare` trains the originals (one per seed) and the retrained models (one per run) as
populations, runs each method as a population, scores every model (`evaluation.evaluate`), and
adds the gaps to Retrain and the run-time efficiency; nothing is written to disk (the main job,
`python -m experiments.unlearn`, adds checkpoints, reports and plots). `table` prints the mean
and std over runs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn

from camu_jax import checks, metrics
from camu_jax import methods as registry
from camu_jax.data.pipeline import DeviceData
from camu_jax.data.splits import Splits
from camu_jax.evaluation import evaluate
from camu_jax.methods.base import Method, run_population
from camu_jax.models import init_variables
from camu_jax.relearning import RelearnConfig, relearn
from camu_jax.training import TrainConfig, train_population

GAP_KEYS = ("UA", "RA", "TA", "mia_efficacy")


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
) -> list[dict]:
    """Runs original, retrain and `methods` (names of `camu_jax.methods`, or configs) on every
    run (`splits[i]`, `seeds[i]`); returns per run `{'seed', 'methods': {name: metrics}}` (and
    `'relearn': {name: curve}` with `relearning`).

    `forget_classes[i]` are run i's forgotten classes (class removal), or None (default: the
    classes D_f holds only where D_f is whole classes, else None); `train_config` the recipe of
    the original and retrained models (default the reference's, `TrainConfig()`). Metrics:
    `evaluation.score`'s, plus `avg_gap` (to Retrain over UA, RA, TA, MIA-efficacy), `seconds`
    and `rte`.
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
    configs = [registry.get(m) if isinstance(m, str) else m for m in methods]
    names = [m.name for m in configs]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"methods {names} name {', '.join(twice)} more than once")
    unique_seeds = sorted(set(seeds))
    kw = dict(population_size=population_size, progress=progress)
    start = [init_variables(model, jax.random.key(s), train.input_shape) for s in unique_seeds]
    originals = dict(
        zip(
            unique_seeds,
            train_population(
                model,
                start,
                data=train,
                items=[np.arange(train.size)] * len(start),
                seeds=unique_seeds,
                config=train_config,
                desc="original",
                **kw,
            ),
            strict=True,
        )
    )
    models = {"original": [originals[s] for s in seeds]}
    models["retrain"] = train_population(
        model,
        [init_variables(model, jax.random.key(s), train.input_shape) for s in seeds],
        data=train,
        items=[sp.remain for sp in splits],
        seeds=seeds,
        config=train_config,
        desc="retrain",
        **kw,
    )
    for m in configs:
        models[m.name] = run_population(
            m,
            model,
            [v for v, _ in models["original"]],
            data=train,
            splits=splits,
            seeds=seeds,
            num_classes=num_classes,
            **kw,
        )
    out = [{"seed": s, "methods": {}} for s in seeds]
    for name, results in models.items():
        scores = evaluate(
            model,
            [v for v, _ in results],
            train=train,
            test=test,
            splits=splits,
            forget_classes=forget_classes,
            seeds=seeds,
            population_size=population_size,
        )
        for run, s, (_, info) in zip(out, scores, results, strict=True):
            run["methods"][name] = {**s, "seconds": info["seconds"]}
    for run in out:
        metrics.add_gaps(run["methods"], GAP_KEYS)
    if relearning:
        names = [m.name for m in configs] + ["retrain"]
        which = [(n, i) for n in names for i in range(len(splits))]
        curves = relearn(
            model,
            [models[n][i][0] for n, i in which],
            data=train,
            splits=[splits[i] for _, i in which],
            seeds=[seeds[i] for _, i in which],
            config=RelearnConfig(
                train=TrainConfig(
                    epochs=1,
                    batch_size=train_config.batch_size,
                    learning_rate=train_config.learning_rate,
                    weight_decay=train_config.weight_decay,
                )
            ),
            population_size=population_size,
            progress=progress,
        )
        for (n, i), curve in zip(which, curves, strict=True):
            out[i].setdefault("relearn", {})[n] = curve
    return out


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


TABLE_COLUMNS = (
    ("UA", "UA"),
    ("RA", "RA"),
    ("TA", "TA"),
    ("mia_efficacy", "MIA-eff"),
    ("mia", "MIA"),
    ("avg_gap", "Avg.Gap"),
    ("seconds", "time s"),
    ("rte", "RTE"),
)


def table(runs: Sequence[dict]) -> str:
    """Mean ± std over runs, one row per method (SalUn's columns and the reference's MIA)."""
    if len(runs) == 0:
        raise ValueError("table needs at least one run (what compare returns), got none")
    names = list(runs[0]["methods"])
    width = max(10, *(len(n) + 1 for n in names))
    lines = [f"{'method':<{width}}" + "".join(f"{h:>16}" for _, h in TABLE_COLUMNS)]
    for name in names:
        cells = []
        for key, _ in TABLE_COLUMNS:
            values = [r["methods"][name].get(key) for r in runs]
            values = [v for v in values if v is not None and not math.isnan(v)]
            if values:
                mean, std = metrics.mean_std(values)
                cells.append(f"{mean:>9.2f} ±{std:>5.2f}")
            else:
                cells.append(f"{'-':>16}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)
