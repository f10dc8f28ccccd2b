"""Timing helpers: A/B alternation, medians, JAX's compile seconds."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def alternate(runners: dict[str, Callable], repeats: int) -> dict[str, list]:
    """Calls each runner in turn (A B A B ...) `repeats` times, so every side sees the same
    machine state (other jobs, thermal state) as often; returns each side's results in order."""
    out = {k: [] for k in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            out[name].append(run())
    return out


class CompileTimer:
    """The seconds JAX spent tracing, lowering and compiling inside the last `measure()` block
    (`camu_jax.engine.compile_seconds`, JAX's own compile events)."""

    def __init__(self):
        self.total = 0.0

    @contextlib.contextmanager
    def measure(self):
        from camu_jax.engine import compile_seconds

        start = compile_seconds()
        self.total = 0.0
        try:
            yield self
        finally:
            self.total = compile_seconds() - start
