"""Settings are data (issue 17, item 1) for CaMU, SSD, Unrolling SGD and Boundary expand.

For each method, on a tiny fixture (96 random 8x8 images, an untrained digits CNN, class 0
forgotten, two members of seeds 0 and 1), three populations of two members run on one layout
(`population_size=2`): configs [a, a], then [a, b] and [b, b], where b differs from a in every
float setting the method reads as data.

* Another value compiles nothing: the second and third populations build no program
  (`engine.Timer().programs` is empty) and add no engine to the runner's cache.
* Members never mix: member 0 of [a, b] is bit-identical to member 0 of [a, a], member 1 of
  [a, b] to member 1 of [b, b]; and b's results differ from a's.
"""

import dataclasses

import jax
import numpy as np
import pytest

from camu_jax import engine, methods, runner
from camu_jax.methods.boundary import BoundaryExpand
from camu_jax.methods.camu import CamuCoefficients, CamuConfig
from camu_jax.methods.ssd import SSD
from camu_jax.methods.unrolling import UnrollingSGD

SEEDS = (0, 1)

CASES = {
    # method: (a, b), b differing from a in every data setting
    "camu": (
        CamuConfig(epochs=2),
        CamuConfig(
            epochs=2,
            kl_lr=2e-3,
            impair_lr=3e-3,
            weight_decay=1e-2,
            coefficients=CamuCoefficients(
                rep_sample=0.25, rep_forget=0.75, out_sample=0.5, out_forget=0.5
            ),
        ),
    ),
    "ssd": (SSD(), SSD(alpha=0.3, lam=0.5)),
    "unrolling": (UnrollingSGD(), UnrollingSGD(learning_rate=1e-2)),
    # Two epochs, so that the momentum acts.
    "boundary_expand": (
        BoundaryExpand(epochs=2, batch_size=8),
        BoundaryExpand(epochs=2, batch_size=8, learning_rate=1e-2, momentum=0.5),
    ),
}


@pytest.fixture(scope="module")
def tiny(tiny_unlearning):
    """Two runs (seeds 0 and 1) of `tiny_unlearning` (tests/conftest.py)."""
    return tiny_unlearning


def population(tiny, configs):
    out = methods.run_population(
        list(configs),
        tiny["model"],
        tiny["originals"],
        data=tiny["data"],
        splits=tiny["splits"],
        seeds=list(SEEDS),
        num_classes=10,
        population_size=2,
        progress=False,
    )
    leaves = []
    for variables, info in out:
        assert variables is not None and "diverged" not in info, info
        leaves.append([np.asarray(x) for x in jax.tree.leaves(variables)])
    return leaves


def same(x, y):
    return all(np.array_equal(a, b) for a, b in zip(x, y, strict=True))


def test_every_float_setting_is_data():
    for name, (a, b) in CASES.items():
        assert type(a).settings_as_data, name
        assert a.skeleton() == b.skeleton(), name  # one program for both
        changed = jax.tree.map(lambda x, y: bool(x != y), a.data_settings(), b.data_settings())
        assert all(jax.tree.leaves(changed)), (name, changed)  # b changes every data setting
        assert type(a).static_settings == (), name  # no float setting fixes a shape
        assert not list(_floats(a.skeleton())), name  # every float setting is data


def _floats(config):
    """The float values left in a (nested) config."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from _floats(value)
        elif isinstance(value, float):
            yield f.name, value


@pytest.mark.parametrize("name", list(CASES))
def test_other_values_compile_nothing_and_members_never_mix(tiny, name):
    a, b = CASES[name]
    aa = population(tiny, [a, a])  # compiles the method's programs
    engines = len(runner._ENGINES)
    timer = engine.Timer()
    ab = population(tiny, [a, b])
    bb = population(tiny, [b, b])
    assert timer.programs == {}, (name, timer.programs)
    assert len(runner._ENGINES) == engines, name
    assert same(ab[0], aa[0]), name
    assert same(ab[1], bb[1]), name
    assert not same(ab[1], aa[1]), name
    assert not same(bb[0], aa[0]), name
