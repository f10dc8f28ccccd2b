"""Experiment configuration: one frozen value, with the reference's presets derived from it."""

from __future__ import annotations

import dataclasses

from camu_jax.data.splits import ForgetSpec, cifar100_class_spec
from camu_jax.unlearning import CamuConfig, camu_preset

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")
NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
SCENARIOS = ("class", "random", "proportions", "indices")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one `python -m experiments.unlearn` invocation does.

    forget_classes: for scenario "class", a tuple of class groups: each group is forgotten
      together in its own run (`--forget-class all` gives one group per class).
    camu: None means the reference preset for (dataset, scenario).
    """

    dataset: str = "digits"
    model: str = "cnn"
    scenario: str = "class"
    forget_classes: tuple[tuple[int, ...], ...] = ((0,),)
    forget_fraction: float = 0.1
    forget_proportions: tuple[float, ...] = ()
    forget_indices: tuple[int, ...] = ()
    seeds: tuple[int, ...] = (0,)
    original_epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    camu: CamuConfig | None = None
    relearn: bool = True
    relearn_every: int = 100
    workdir: str = "runs/default"
    checkpoint_dir: str | None = None  # default <workdir>/checkpoints
    data_dir: str | None = None
    manual_dir: str | None = None
    progress: bool = True

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.dataset]

    def camu_config(self) -> CamuConfig:
        preset_scenario = "class" if self.scenario == "class" else "random"
        return self.camu or camu_preset(self.dataset, preset_scenario)

    def forget_specs(self) -> list[tuple[tuple[int, ...] | None, ForgetSpec]]:
        """`(forgotten classes or None, spec)` for every forgetting run of one seed."""
        if self.scenario == "class":
            out = []
            for group in self.forget_classes:
                if self.dataset == "cifar100" and len(group) == 1:
                    out.append((group, cifar100_class_spec(group[0])))
                else:
                    out.append((group, ForgetSpec(kind="class", classes=group)))
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
        if self.scenario == "random" and not 0.0 < self.forget_fraction < 1.0:
            raise ValueError(
                f"forget fraction {self.forget_fraction} must lie strictly between 0 and 1"
            )
        if self.scenario == "indices" and not self.forget_indices:
            raise ValueError("scenario 'indices' needs a non-empty --forget-indices file")
        if self.manual_dir is not None:
            from pathlib import Path

            if not Path(self.manual_dir).is_dir():
                raise ValueError(f"manual dir {self.manual_dir} does not exist or is not a folder")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if self.original_epochs < 1:
            raise ValueError(f"original epochs must be >= 1, got {self.original_epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")


def default_model(dataset: str) -> str:
    """The reference's model for a dataset: the CNN for MNIST-like data, ResNet18 for CIFAR."""
    return "resnet18" if dataset in ("cifar10", "cifar100") else "cnn"
