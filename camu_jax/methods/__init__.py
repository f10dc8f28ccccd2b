"""Unlearning methods behind one interface (`camu_jax.methods.base.Method`), and their registry.

Every method runs as a population on the loop engine with `run_population(method, model,
originals, data=..., splits=..., seeds=..., num_classes=...)`; `get("name")` returns a method's
default config (its paper's or official code's settings for these models).
"""

from __future__ import annotations

from camu_jax.methods.base import MemberContext, Method, Stage, run_population
from camu_jax.methods.camu import CamuConfig, camu_preset
from camu_jax.methods.finetune import FineTune, GradientAscent, L1Sparse, LossMethod, NegGradPlus
from camu_jax.methods.relabel import Amnesiac, RandomLabels
from camu_jax.methods.salun import SalUn

REGISTRY: dict[str, type[Method]] = {
    "camu": CamuConfig,
    "ft": FineTune,
    "ga": GradientAscent,
    "neggrad_plus": NegGradPlus,
    "rl": RandomLabels,
    "amnesiac": Amnesiac,
    "l1_sparse": L1Sparse,
    "salun": SalUn,
}


def names() -> tuple[str, ...]:
    """Every registered method, in the order results tables list them."""
    return tuple(REGISTRY)


def get(name: str, **overrides) -> Method:
    """The default config of method `name` with `overrides` applied; raises ValueError naming
    an unknown method with the list of known ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(names())}")
    return REGISTRY[name](**overrides)


__all__ = [
    "REGISTRY",
    "Amnesiac",
    "CamuConfig",
    "FineTune",
    "GradientAscent",
    "L1Sparse",
    "LossMethod",
    "NegGradPlus",
    "RandomLabels",
    "SalUn",
    "MemberContext",
    "Method",
    "Stage",
    "camu_preset",
    "get",
    "names",
    "run_population",
]
