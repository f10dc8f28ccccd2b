"""Unlearning methods behind one interface (`camu_jax.methods.base.Method`), and their registry.

Every method runs as a population on the loop engine with `run_population(method, model,
originals, data=..., splits=..., seeds=..., num_classes=...)`; `get("name")` returns a method's
default config (its paper's or official code's settings for these models).
"""

from __future__ import annotations

from camu_jax.methods.base import MemberContext, Method, Stage, run_population
from camu_jax.methods.boundary import BoundaryExpand, BoundaryShrink
from camu_jax.methods.camu import CamuConfig, camu_preset
from camu_jax.methods.finetune import FineTune, GradientAscent, LossMethod
from camu_jax.methods.teachers import BadTeacher, Scrub
from camu_jax.methods.unsir import Unsir

REGISTRY: dict[str, type[Method]] = {
    "camu": CamuConfig,
    "ft": FineTune,
    "ga": GradientAscent,
    "boundary_shrink": BoundaryShrink,
    "boundary_expand": BoundaryExpand,
    "unsir": Unsir,
    "bad_teacher": BadTeacher,
    "scrub": Scrub,
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
    "BadTeacher",
    "BoundaryExpand",
    "BoundaryShrink",
    "CamuConfig",
    "FineTune",
    "GradientAscent",
    "LossMethod",
    "MemberContext",
    "Method",
    "Scrub",
    "Stage",
    "Unsir",
    "camu_preset",
    "get",
    "names",
    "run_population",
]
