"""Experiment configuration: one frozen value, with the reference's presets derived from it."""

from __future__ import annotations

import dataclasses
import numbers

from camu_jax.data import catalog
from camu_jax.data.splits import ForgetSpec
from camu_jax.steps import check_number
from camu_jax.unlearning import CamuConfig, camu_preset

DATASETS = catalog.NAMES
NUM_CLASSES = {name: d.num_classes for name, d in catalog.CATALOG.items()}
SCENARIOS = ("class", "random", "proportions", "indices")
# A seed seeds jax.random.key, numpy's default_rng and the attacks' scikit-learn random_state,
# which takes 32 unsigned bits (a larger one failed only at the first evaluation, after training).
MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one `python -m experiments.unlearn` invocation does.

    forget_classes: for scenario "class", a tuple of class groups: each group is forgotten
      together in its own run (`--forget-class all` gives one group per class).
    camu: None means the reference preset for (dataset, scenario) with this `batch_size`.
    """

    # digits (ships with scikit-learn), mnist, fashion_mnist, cifar10 or cifar100
    dataset: str = "digits"
    model: str = "cnn"  # cnn, resnet18 (ImageNet stem, 224x224 as the reference), resnet18_cifar
    scenario: str = "class"  # class, random, proportions or indices
    forget_classes: tuple[tuple[int, ...], ...] = ((0,),)
    forget_fraction: float = 0.1  # scenario random: the forgotten share of the training set
    forget_proportions: tuple[float, ...] = ()  # scenario proportions: per-class shares
    forget_indices: tuple[int, ...] = ()  # scenario indices: training indices to forget
    seeds: tuple[int, ...] = (0,)  # one run per seed
    original_epochs: int = 20  # epochs of the original and the retrained model (reference: 20)
    # Batch of every phase: original, retrain, relearning, and CaMU unless camu.batch_size is set.
    batch_size: int = 32
    learning_rate: float = 1e-3  # Adam lr of the original, retrained and relearning models
    weight_decay: float = 1e-4  # their coupled L2 (PyTorch Adam's weight_decay)
    camu: CamuConfig | None = None
    # Unlearning methods compared with original and retrain: comma separated names of
    # camu_jax.methods (camu, ft, ga, ...), or all
    methods: tuple[str, ...] = ("camu",)
    # An unlearning method whose loss or parameters turn non-finite for a run: record (its
    # cells say diverged, the study goes on) or stop (exit 2 naming the run, before any results
    # or its checkpoint are written)
    on_divergence: str = "record"
    relearn: bool = True  # the relearning check (one epoch on D_r) after unlearning
    relearn_every: int = 100  # batches between two points of the relearning curve
    # Runs trained together as one program (a population); none: every run of a phase at once
    # (waves that fit the device's free memory); 1: one run at a time (the sequential path).
    population_size: int | None = None
    # Processes that fit the membership attacks of different models in parallel (default: the
    # usable cores; 1: in this process). The metric values do not depend on it.
    eval_workers: int | None = None
    workdir: str = "runs/default"  # results, splits, reports
    checkpoint_dir: str | None = None  # trained models, reused (default <workdir>/checkpoints)
    data_dir: str | None = None  # TFDS data dir (default ~/tensorflow_datasets)
    manual_dir: str | None = None  # offline source files for the TFDS builder
    progress: bool = True  # progress bars

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.dataset]

    def camu_config(self) -> CamuConfig:
        """`camu`, or the reference preset with `batch_size`: the batch is one setting of the
        whole run unless `camu` says otherwise."""
        if self.camu is not None:
            return self.camu
        preset_scenario = "class" if self.scenario == "class" else "random"
        preset = camu_preset(self.dataset, preset_scenario)
        return dataclasses.replace(preset, batch_size=self.batch_size)

    def method_names(self) -> tuple[str, ...]:
        """The unlearning methods of the study, `all` expanded, in registry order."""
        from camu_jax import methods

        if "all" in self.methods:
            return methods.names()
        return tuple(self.methods)

    def method_configs(self) -> dict:
        """`{name: config}` of every method of the study: CaMU's is `camu_config()` (it follows
        `--batch-size`, as the reference's CaMU trains with the original's batch); every other
        method its default config: its paper's or official code's settings, batch included
        (`docs/methods.md`), which the tuning of `docs/methods.md` also used."""
        from camu_jax import methods

        return {
            name: self.camu_config() if name == "camu" else methods.get(name)
            for name in self.method_names()
        }

    def forget_specs(self) -> list[tuple[tuple[int, ...] | None, ForgetSpec]]:
        """`(forgotten classes or None, spec)` for every forgetting run of one seed."""
        if self.scenario == "class":
            out = []
            for group in self.forget_classes:
                # The reference repeats a single CIFAR-100 class (`catalog.class_repeat`).
                repeat = catalog.info(self.dataset).class_repeat if len(group) == 1 else 1
                out.append((group, ForgetSpec(kind="class", classes=group, repeat=repeat)))
            return out
        if self.scenario == "random":
            return [(None, ForgetSpec(kind="random", fraction=self.forget_fraction))]
        if self.scenario == "proportions":
            return [(None, ForgetSpec(kind="proportions", proportions=self.forget_proportions))]
        return [(None, ForgetSpec(kind="indices", indices=self.forget_indices))]

    def validate(self) -> None:
        """Raises ValueError naming the first bad value (before anything is written)."""
        from camu_jax.models import MODELS

        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; allowed: {', '.join(DATASETS)}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; allowed: {', '.join(MODELS)}")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; allowed: {', '.join(SCENARIOS)}")
        if self.scenario == "class":
            if not self.forget_classes or any(not g for g in self.forget_classes):
                raise ValueError("class removal needs at least one forget class")
            for group in self.forget_classes:
                for c in group:
                    if not 0 <= c < self.num_classes:
                        raise ValueError(
                            f"forget class {c} is outside the label range 0..{self.num_classes - 1}"
                            f" of {self.dataset}"
                        )
                if len(set(group)) != len(group):
                    twice = sorted({c for c in group if group.count(c) > 1})
                    raise ValueError(
                        f"--forget-class {','.join(map(str, group))} names class "
                        f"{','.join(map(str, twice))} more than once"
                    )
        if self.scenario == "random" and not 0.0 < self.forget_fraction < 1.0:  # also NaN
            raise ValueError(
                f"forget fraction {self.forget_fraction} must lie strictly between 0 and 1"
            )
        if self.scenario == "proportions":
            for p in self.forget_proportions:
                if not 0.0 <= p <= 1.0:  # also NaN
                    raise ValueError(f"forget proportion {p} must lie in [0, 1]")
        if self.scenario == "indices" and not self.forget_indices:
            raise ValueError("scenario 'indices' needs a non-empty --forget-indices file")
        for i in self.forget_indices:
            # np.asarray(..., int64) later would silently truncate 3.5 to 3: the wrong item.
            if not isinstance(i, numbers.Integral) or isinstance(i, bool):
                raise ValueError(f"forget indices must be integers, got {i!r}")
        if self.manual_dir is not None:
            from pathlib import Path

            if not Path(self.manual_dir).is_dir():
                raise ValueError(f"manual dir {self.manual_dir} does not exist or is not a folder")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        for seed in self.seeds:
            # Before check_number: math.isfinite overflows on an int of 400 digits.
            if isinstance(seed, int) and not isinstance(seed, bool) and seed > MAX_SEED:
                raise ValueError(f"--seeds {seed} is outside the seed range 0..{MAX_SEED}")
            check_number("seed", seed, integer=True, positive=False)
        if len(set(self.seeds)) != len(self.seeds):
            twice = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
            raise ValueError(
                f"--seeds {','.join(map(str, self.seeds))} gives seed "
                f"{','.join(map(str, twice))} more than once (each seed is one run)"
            )
        check_number("original epochs", self.original_epochs, integer=True)
        check_number("batch size", self.batch_size, integer=True)
        check_number("learning rate", self.learning_rate)
        check_number("weight decay", self.weight_decay, positive=False)
        check_number("relearn every", self.relearn_every, integer=True)
        if self.on_divergence not in ("record", "stop"):
            raise ValueError(f"on divergence must be record or stop, got {self.on_divergence!r}")
        for name in ("population_size", "eval_workers"):
            if getattr(self, name) is not None:
                check_number(name.replace("_", " "), getattr(self, name), integer=True)
        self.camu_config().validate()
        from camu_jax import methods

        if not self.methods:
            raise ValueError("at least one method is needed (--methods camu,ft,... or all)")
        for name in self.methods:
            if name != "all" and name not in methods.REGISTRY:
                raise ValueError(
                    f"unknown method {name!r}; known methods: {', '.join(methods.names())}, all"
                )
        if len(set(self.methods)) != len(self.methods):
            twice = sorted({m for m in self.methods if self.methods.count(m) > 1})
            raise ValueError(
                f"--methods {','.join(self.methods)} names {', '.join(twice)} more than once"
            )
        for config in self.method_configs().values():
            config.validate()


def default_model(dataset: str) -> str:
    """The reference's model for a dataset: the CNN for MNIST-like data, ResNet18 for CIFAR."""
    return catalog.CATALOG[dataset].default_model if dataset in catalog.CATALOG else "cnn"
