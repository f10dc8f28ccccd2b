"""Unlearning methods behind one interface (`camu_jax.methods.base.Method`), and their registry.

Every method runs as a population on the loop engine with `run_population(method, model,
originals, data=..., splits=..., seeds=..., num_classes=...)`; `get("name")` returns a method's
default config (its paper's or official code's settings for these models, else tuned for the
MNIST CNN); `get("name", dataset="digits")` the defaults for a dataset
(`camu_jax.methods.defaults`: a dataset without an entry gets the class defaults).

One's own method (docs/custom_methods.md): a frozen dataclass on `LossMethod` with a `loss`
written with `forward` and `cross_entropy` (run as a population like the built-in ones), or a
plain function `unlearning(variables, retain, forget, validation) -> variables` wrapped by
`from_function` (run one run at a time).
"""

from __future__ import annotations

from camu_jax import losses
from camu_jax.methods.adapter import Examples, FunctionMethod, from_function
from camu_jax.methods.base import MemberContext, Method, Stage, run_population
from camu_jax.methods.boundary import BoundaryExpand, BoundaryShrink
from camu_jax.methods.camu import CamuConfig, camu_preset
from camu_jax.methods.defaults import DATASET_DEFAULTS, for_dataset
from camu_jax.methods.finetune import (
    FineTune,
    GradientAscent,
    L1Sparse,
    LossMethod,
    NegGradPlus,
    forward,
    setting,
)
from camu_jax.methods.relabel import Amnesiac, RandomLabels
from camu_jax.methods.salun import SalUn
from camu_jax.methods.ssd import SSD
from camu_jax.methods.teachers import BadTeacher, Scrub
from camu_jax.methods.unrolling import UnrollingSGD
from camu_jax.methods.unsir import Unsir

REGISTRY: dict[str, type[Method]] = {
    "camu": CamuConfig,
    "ft": FineTune,
    "ga": GradientAscent,
    "neggrad_plus": NegGradPlus,
    "rl": RandomLabels,
    "boundary_shrink": BoundaryShrink,
    "boundary_expand": BoundaryExpand,
    "amnesiac": Amnesiac,
    "unsir": Unsir,
    "bad_teacher": BadTeacher,
    "scrub": Scrub,
    "salun": SalUn,
    "l1_sparse": L1Sparse,
    "ssd": SSD,
    "unrolling": UnrollingSGD,
}


def cross_entropy(logits, labels, mask=None):
    """Mean cross-entropy of `logits` `[batch, classes]` against integer `labels` `[batch]`
    over the rows where `mask` `[batch]` is 1 (None: every row): a `LossMethod.loss`'s term
    for a stream's batch (`mask` = `batch[stream]["mask"]`, 0 on the padding of a short last
    batch)."""
    return losses.cross_entropy_mean(logits=logits, labels=labels, weights=mask)


def names() -> tuple[str, ...]:
    """Every registered method, in the order results tables list them."""
    return tuple(REGISTRY)


def get(name: str, dataset: str | None = None, **overrides) -> Method:
    """The default config of method `name` with `overrides` applied. The defaults are the
    class's (the MNIST CNN's) with, for `dataset`, that dataset's entry of
    `camu_jax.methods.defaults.DATASET_DEFAULTS` over them (None, or a dataset without an
    entry: the class defaults); `overrides` win over both. Raises ValueError naming an unknown
    method with the list of known ones, or an unknown dataset with the list of datasets."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(names())}")
    return REGISTRY[name](**{**for_dataset(dataset, name), **overrides})


__all__ = [
    "DATASET_DEFAULTS",
    "REGISTRY",
    "SSD",
    "Amnesiac",
    "BadTeacher",
    "BoundaryExpand",
    "BoundaryShrink",
    "CamuConfig",
    "Examples",
    "FineTune",
    "FunctionMethod",
    "GradientAscent",
    "L1Sparse",
    "LossMethod",
    "MemberContext",
    "Method",
    "NegGradPlus",
    "RandomLabels",
    "SalUn",
    "Scrub",
    "Stage",
    "UnrollingSGD",
    "Unsir",
    "camu_preset",
    "cross_entropy",
    "forward",
    "from_function",
    "get",
    "names",
    "run_population",
    "setting",
]
