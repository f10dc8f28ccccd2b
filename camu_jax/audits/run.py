"""`audit`: trains every population the asked metrics need once, as populations on the wave
runner, and scores the unlearning methods against them.

* U-LiRA: `models` shadow originals on complementary random halves (`design.ulira_design`),
  each unlearned by every method from its own random forget set; Retrain's row retrains each
  on its half minus its forget set; the `original` row is no unlearning (plain LiRA: the
  ceiling). Not defined for class removal (a class is no random sample of the data: there are
  no models that never saw its distribution).
* KLOM and the epsilon score share one forget set F and `models` originals on D, each
  unlearned once by every method, and `models` oracles retrained on D \\ F; the floor is
  Retrain's row (as many other oracles, from the originals' seeds), the ceiling the originals.

Every model is checkpointed in a `camu_jax.study.Store` as the study's are (and restored
from it on a rerun); phi is one device pass per population (`phi.population_phi`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import linen as nn
from tqdm.auto import tqdm

from camu_jax import engine
from camu_jax import keys as host_keys
from camu_jax.audits import design, metrics
from camu_jax.audits.phi import population_phi
from camu_jax.compare import method_configs
from camu_jax.data.pipeline import DeviceData
from camu_jax.methods.base import Method, run_population
from camu_jax.models import init_variables
from camu_jax.study import UNLEARNING, Store, folder_name
from camu_jax.training import TrainConfig, train_population

METRICS = ("ulira", "klom", "epsilon")
BASELINE_ROWS = ("original", "retrain")


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """What `audit` measures.

    metrics: any of "ulira", "klom", "epsilon". models: shadow models per population (even,
    >= 2). forget_fraction: the forget sets' share (U-LiRA: of each model's half; KLOM and
    epsilon: of the training set). forget_classes: KLOM and epsilon forget these whole classes
    instead (U-LiRA refuses them). variance: U-LiRA's Gaussians, "auto", "global" or
    "per_example" (`metrics.lira_variance`)."""

    metrics: tuple[str, ...] = METRICS
    models: int = 64
    forget_fraction: float = 0.1
    forget_classes: tuple[int, ...] | None = None
    seed: int = 0
    variance: str = "auto"

    def validate(self, num_classes: int | None = None) -> None:
        """Raises ValueError naming the first bad value."""
        if not self.metrics:
            raise ValueError(f"at least one metric is needed; allowed: {', '.join(METRICS)}")
        for m in self.metrics:
            if m not in METRICS:
                raise ValueError(f"unknown metric {m!r}; allowed: {', '.join(METRICS)}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics {','.join(self.metrics)} name one metric twice")
        design.check_models(self.models)
        design.check_fraction(self.forget_fraction)
        if self.forget_classes and "ulira" in self.metrics:
            raise ValueError(
                f"U-LiRA audits random forget sets only; class removal (forget classes "
                f"{','.join(map(str, self.forget_classes))}) does not apply: its forget set is "
                "no random sample of the data. Audit it with klom,epsilon"
            )
        for c in self.forget_classes or ():
            if num_classes is not None and not 0 <= c < num_classes:
                raise ValueError(
                    f"forget class {c} is outside the label range 0..{num_classes - 1}"
                )
        if self.variance not in ("auto", "global", "per_example"):
            raise ValueError(f"variance {self.variance!r}; allowed: auto, global, per_example")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")


class _Audit:
    """The populations of one audit: training, unlearning and phi, checkpointed in `store`."""

    def __init__(self, model, train, test, train_config, num_classes, store, size, progress, log):
        self.model, self.train, self.test = model, train, test
        self.train_config, self.num_classes, self.store = train_config, num_classes, store
        self.size, self.progress, self.log = size, progress, log
        self.phases: list[dict] = []

    def phase(self, name: str, timer: engine.Timer, members: int) -> None:
        self.phases.append(
            {"phase": name, "seconds": timer.seconds, "members": members, **timer.compile_record()}
        )

    def meta(self, kind: str, seed: int, extra: dict) -> dict:
        c = self.train_config
        return {
            "kind": kind,
            **(self.store.identity if self.store else {}),
            "num_classes": self.num_classes,
            "input_shape": list(self.train.input_shape),
            "seed": int(seed),
            "epochs": c.epochs,
            "batch_size": c.batch_size,
            "learning_rate": c.learning_rate,
            "weight_decay": c.weight_decay,
            **extra,
        }

    def _checkpoints(self, kinds, names, metas) -> dict:
        if self.store is None:
            return {}
        dirs = [self.store.directory(k, n, m) for k, n, m in zip(kinds, names, metas, strict=True)]
        return {
            "checkpoint_dirs": dirs,
            "metas": metas,
            "checkpoint_every": self.store.checkpoint_every,
        }

    def train_models(self, phase: str, members: list[tuple[str, str, np.ndarray, int]]) -> list:
        """`(kind, name, items, seed)` per member, trained as one population."""
        timer = engine.Timer()
        kinds, names, items, seeds = (list(x) for x in zip(*members, strict=True))
        metas = [self.meta(k, s, {"items": design.digest(it)}) for k, _, it, s in members]
        shape = self.train.input_shape
        out = train_population(
            self.model,
            [init_variables(self.model, host_keys.key_data(s), shape) for s in seeds],
            data=self.train,
            items=items,
            seeds=seeds,
            config=self.train_config,
            names=[f"{k} {n}" for k, n in zip(kinds, names, strict=True)],
            population_size=self.size,
            progress=self.progress,
            desc=phase,
            **self._checkpoints(kinds, names, metas),
        )
        self.phase(phase, timer, len(members))
        return [v for v, _ in out]

    def unlearn(self, phase: str, config: Method, originals, splits, seeds, names) -> list:
        timer = engine.Timer()
        metas = [
            self.meta(
                config.name,
                s,
                {
                    "split": design.digest(sp.forget),
                    "run": n,
                    "method_config": dataclasses.asdict(config),
                },
            )
            for s, sp, n in zip(seeds, splits, names, strict=True)
        ]
        kinds = [f"{UNLEARNING}/{folder_name(config.name)}"] * len(names)
        out = run_population(
            config,
            self.model,
            originals,
            data=self.train,
            splits=splits,
            seeds=seeds,
            num_classes=self.num_classes,
            names=[f"{config.name} {n}" for n in names],
            population_size=self.size,
            progress=self.progress,
            on_divergence="record",
            **self._checkpoints(kinds, names, metas),
        )
        for n, (_, info) in zip(names, out, strict=True):
            if "diverged" in info:
                self.log(f"warning: {config.name} diverged on {n}: {info['diverged']}; left out")
        self.phase(phase, timer, len(names))
        return [v for v, _ in out]

    def phi(self, phase: str, populations: dict[str, list], data: DeviceData) -> dict:
        timer = engine.Timer()
        out = {}
        for row, variables in tqdm(
            populations.items(), desc=phase, disable=not self.progress, leave=False
        ):
            out[row] = population_phi(
                self.model, variables, data, population_size=self.size, log=self.log
            )
        self.phase(phase, timer, sum(len(v) for v in populations.values()))
        return out


def audit(
    model: nn.Module,
    *,
    train: DeviceData,
    test: DeviceData,
    methods: Sequence[str | Method] = ("camu",),
    train_config: TrainConfig | None = None,
    num_classes: int | None = None,
    config: AuditConfig = AuditConfig(),
    dataset: str | None = None,
    store: Store | None = None,
    population_size: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Audits `methods` (names of `camu_jax.methods`, given `dataset`'s defaults, or configs;
    "retrain" and "original" are always audited and may be named) with the metrics of
    `config`, training every population it needs once (module docstring).

    Returns the record: `config`, `method_configs`, `rows` (original, retrain, the methods),
    per metric its figures per row (`ulira`, `klom`, `epsilon`, each with its model count),
    `per_example` (numpy arrays for histograms: KLOM per example and group, epsilon per forget
    example), `phases` (seconds, compile records) and `seconds`.
    """
    start = time.perf_counter()
    num_classes = num_classes or int(train.host_labels.max()) + 1
    config.validate(num_classes)
    train_config = TrainConfig() if train_config is None else train_config
    train_config.validate()
    log = log if (log is not None and jax.process_index() == 0) else (lambda *_: None)
    named = [m for m in methods if not (isinstance(m, str) and m in BASELINE_ROWS)]
    configs = method_configs(named, dataset)
    names = [c.name for c in configs]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"methods {names} name {', '.join(twice)} more than once")
    for c in configs:
        c.validate()
    s = _Audit(model, train, test, train_config, num_classes, store, population_size, progress, log)
    record = {
        "config": {**dataclasses.asdict(config), "train": dataclasses.asdict(train_config)},
        "method_configs": {c.name: dataclasses.asdict(c) for c in configs},
        "rows": [*BASELINE_ROWS, *names],
        "per_example": {},
    }
    if "ulira" in config.metrics:
        record["ulira"] = _ulira(s, configs, config)
    if {"klom", "epsilon"} & set(config.metrics):
        out, per_example = _forget_metrics(s, configs, config)
        record.update(out)
        record["per_example"].update(per_example)
    record["phases"] = s.phases
    record["seconds"] = time.perf_counter() - start
    return record


def _ulira(s: _Audit, configs: list[Method], config: AuditConfig) -> dict:
    d = design.ulira_design(
        s.train.size, models=config.models, forget_fraction=config.forget_fraction, seed=config.seed
    )
    names = [f"ulira-m{i}" for i in range(config.models)]
    members = [("original", n, h, sd) for n, h, sd in zip(names, d.halves, d.seeds, strict=True)]
    members += [
        ("retrain", n, sp.remain, sd) for n, sp, sd in zip(names, d.splits, d.seeds, strict=True)
    ]
    trained = s.train_models("U-LiRA: train", members)
    models = config.models
    populations = {"original": trained[:models], "retrain": trained[models:]}
    for c in configs:
        populations[c.name] = s.unlearn(
            f"U-LiRA: {c.name}", c, populations["original"], d.splits, d.seeds, names
        )
    phi = s.phi("U-LiRA: phi", populations, s.train)
    timer = engine.Timer()
    rows = {}
    variance = None
    for row, p in phi.items():
        variance = variance or metrics.lira_variance(
            d.forgot, d.unseen, p["valid"], config.variance
        )
        scores = metrics.lira_scores(
            p["phi"],
            member=d.forgot,
            nonmember=d.unseen,
            valid=p["valid"],
            variance=variance,
            progress=s.progress,
        )
        rows[row] = {
            **metrics.attack_summary(scores, member=d.forgot, nonmember=d.unseen),
            "models": int(p["valid"].sum()),
        }
    s.phase("U-LiRA: scores", timer, len(phi))
    return {
        "models": models,
        "variance": variance,
        "forget_size": float(np.mean([sp.forget.size for sp in d.splits])),
        "methods": rows,
    }


def _forget_metrics(s: _Audit, configs: list[Method], config: AuditConfig):
    d = design.forget_design(
        s.train.host_labels,
        models=config.models,
        forget_fraction=config.forget_fraction,
        classes=config.forget_classes,
        seed=config.seed,
        num_classes=s.num_classes,
    )
    models = config.models
    tag = "forget-" + design.digest(d.forget)
    names = [f"{tag}-m{i}" for i in range(models)]
    everything = np.arange(s.train.size)
    members = [
        ("original", n, everything, sd) for n, sd in zip(names, d.original_seeds, strict=True)
    ]
    members += [("oracle", n, d.remain, sd) for n, sd in zip(names, d.oracle_seeds, strict=True)]
    members += [("retrain", n, d.remain, sd) for n, sd in zip(names, d.original_seeds, strict=True)]
    trained = s.train_models("KLOM/epsilon: train", members)
    populations = {
        "original": trained[:models],
        "retrain": trained[2 * models :],
        "oracle": trained[models : 2 * models],
    }
    for c in configs:
        populations[c.name] = s.unlearn(
            f"KLOM/epsilon: {c.name}", c, populations["original"], d.splits, d.original_seeds, names
        )
    both = s.train.joined(s.test)
    phi = s.phi("KLOM/epsilon: phi", populations, both)
    n = s.train.size
    groups = {
        "forget": d.forget,
        "retain": d.remain,
        "test": np.arange(n, n + s.test.size),
    }
    oracle = phi.pop("oracle")
    out, per_example = {}, {"groups": groups}
    if "klom" in config.metrics:
        timer = engine.Timer()
        rows, values = {}, {}
        for row, p in phi.items():
            v = metrics.klom(
                p["phi"][p["valid"]], oracle["phi"][oracle["valid"]], progress=s.progress
            )
            values[row] = v
            rows[row] = {**metrics.percentiles(v, groups), "models": int(p["valid"].sum())}
        s.phase("KLOM", timer, len(phi))
        out["klom"] = {
            "models": models,
            "oracles": int(oracle["valid"].sum()),
            "direction": "KL(unlearned || oracle)",
            "sizes": {k: int(len(v)) for k, v in groups.items()},
            "methods": rows,
        }
        per_example["klom"] = values
    if "epsilon" in config.metrics:
        timer = engine.Timer()
        accuracy = _accuracies(oracle, groups)
        rows, values = {}, {}
        for row, p in phi.items():
            f = d.forget
            eps = metrics.epsilons(
                p["phi"][p["valid"]][:, f],
                oracle["phi"][oracle["valid"]][:, f],
                progress=s.progress,
            )
            values[row] = eps
            score = metrics.forget_score(eps, models=int(p["valid"].sum()))
            acc = _accuracies(p, groups)
            rows[row] = {
                "forget_score": score,
                "final_score": None
                if None in (acc["retain"], accuracy["retain"])
                else metrics.final_score(
                    score,
                    ra_unlearned=acc["retain"],
                    ra_retrained=accuracy["retain"],
                    ta_unlearned=acc["test"],
                    ta_retrained=accuracy["test"],
                ),
                "epsilon_median": float(np.nanmedian(eps)) if np.isfinite(eps).any() else None,
                "epsilon_at_cap": int(np.sum(eps >= metrics.EPSILON_CAP)),
                "undefined": int(np.isnan(eps).sum()),
                "retain_accuracy": acc["retain"],
                "test_accuracy": acc["test"],
                "forget_accuracy": acc["forget"],
                "models": int(p["valid"].sum()),
            }
        s.phase("epsilon", timer, len(phi))
        out["epsilon"] = {
            "models": models,
            "delta": metrics.DELTA,
            "cap": metrics.EPSILON_CAP,
            "max_bucket_epsilon": float(np.ceil(np.log(models - 1))) if models > 1 else 0.0,
            "oracle_accuracy": accuracy,
            "forget_size": int(d.forget.size),
            "methods": rows,
        }
        per_example["epsilon"] = values
    return out, per_example


def _accuracies(p: dict, groups: dict[str, np.ndarray]) -> dict:
    """Mean top-1 accuracy (percent) over a population's valid models on each group's rows
    (`forget`, `retain`, `test`)."""
    correct = p["correct"][p["valid"]]
    if not len(correct):
        return dict.fromkeys(groups)
    return {k: float(100 * correct[:, rows].mean()) for k, rows in groups.items()}
