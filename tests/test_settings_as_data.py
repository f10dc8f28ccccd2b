"""Settings are data (issue 17, item 1) for the one-optimizer methods on `LossMethod`: FT, GA,
NegGrad+, l1-sparse, RL, Amnesiac, SalUn, Boundary shrink, Bad Teacher, SCRUB and UNSIR.

Their float settings reach the compiled programs as per-member data, so for every method:

* which settings are data and which stay constants of the program (`static_settings`) is what
  the method says;
* a run with other values of its data settings compiles nothing (no XLA program, no new
  engine), in the same process;
* a population of two members with configs `[a, b]` gives member 0 bit-identical to member 0 of
  `[a, a]` and member 1 bit-identical to member 1 of `[b, b]` (one program, one layout:
  `population_size=2`), and `b`'s member differs from `a`'s.

The runs are tiny (96 random 8x8 images, an untrained CNN, class 0 forgotten, batches of 32,
an epoch or two), in JAX's default float32. CaMU, SSD, Unrolling and Boundary expand:
tests/test_settings_as_data_b.py.
"""

import dataclasses

import jax
import numpy as np
import pytest

from camu_jax import engine, methods, runner

# name: (a's settings, what b changes: every data setting of the method where the tiny run
# allows, zero momenta and weight decays on one side, to show one program serves both)
CASES = {
    "ft": (
        dict(epochs=1, batch_size=32),
        dict(learning_rate=0.03, momentum=0.5, weight_decay=1e-3),
    ),
    "ga": (
        dict(epochs=1, batch_size=32),
        dict(learning_rate=0.02, momentum=0.0, weight_decay=0.0),
    ),
    "neggrad_plus": (
        dict(epochs=1, batch_size=32),
        dict(learning_rate=0.02, momentum=0.5, weight_decay=1e-3, alpha=0.8, anchor_decay=0.0),
    ),
    "l1_sparse": (
        dict(epochs=2, batch_size=32),
        dict(learning_rate=0.05, momentum=0.5, weight_decay=1e-3, gamma=0.05),
    ),
    "rl": (
        dict(epochs=1, batch_size=32),
        dict(learning_rate=0.01, momentum=0.0, weight_decay=0.0),
    ),
    "amnesiac": (
        dict(epochs=1, batch_size=32),
        dict(learning_rate=1e-3, weight_decay=1e-3),
    ),
    "salun": (
        dict(epochs=1, batch_size=32),
        dict(learning_rate=0.01, momentum=0.5, weight_decay=1e-3, saliency_ratio=0.3),
    ),
    "boundary_shrink": (
        dict(epochs=1, batch_size=32),
        dict(learning_rate=0.01, momentum=0.5, weight_decay=1e-3, bound=0.3),
    ),
    "bad_teacher": (
        dict(epochs=1, batch_size=32),
        dict(learning_rate=1e-3, temperature=2.0),
    ),
    "scrub": (
        dict(epochs=2, msteps=1, batch_size=32, forget_batch_size=32, lr_decay_epochs=(1,)),
        dict(
            learning_rate=0.01,
            momentum=0.5,
            weight_decay=1e-3,
            gamma=0.5,
            alpha=0.1,
            temperature=2.0,
            lr_decay_rate=0.5,
        ),
    ),
    "unsir": (
        dict(noise_size=16, noise_steps=3, noise_repeats=2, retain_per_class=4, batch_size=32),
        dict(noise_lr=0.05, noise_weight=0.2, impair_lr=0.004, repair_lr=0.002),
    ),
}

SGD = {"learning_rate", "momentum", "weight_decay"}
# name: (data settings, static settings)
KINDS = {
    "ft": (SGD, ()),
    "ga": (SGD, ()),
    "neggrad_plus": (SGD | {"alpha", "anchor_decay"}, ()),
    "l1_sparse": (SGD | {"gamma"}, ()),
    "rl": (SGD, ()),
    "amnesiac": ({"learning_rate", "weight_decay"}, ()),
    "salun": (SGD | {"saliency_ratio"}, ()),
    "boundary_shrink": (SGD | {"bound"}, ()),
    "bad_teacher": ({"learning_rate", "temperature"}, ("retain_fraction",)),
    "scrub": (SGD | {"gamma", "alpha", "temperature", "lr_decay_rate"}, ()),
    "unsir": ({"noise_lr", "noise_weight", "impair_lr", "repair_lr"}, ()),
}


def test_every_loss_method_is_covered():
    loss_methods = {n for n in methods.names() if isinstance(methods.get(n), methods.LossMethod)}
    assert loss_methods == set(CASES) == set(KINDS)


@pytest.mark.parametrize("name", list(KINDS))
def test_which_settings_are_data(name):
    data, static = KINDS[name]
    config = methods.get(name)
    assert config.settings_as_data and config.static_settings == static
    settings = config.data_settings()
    assert set(settings) == data
    dtype = jax.dtypes.canonicalize_dtype(np.float64)
    assert all(v.dtype == dtype and v == getattr(config, k) for k, v in settings.items())
    skeleton = config.skeleton()
    assert all(getattr(skeleton, k) is None for k in data)
    assert all(getattr(skeleton, k) == getattr(config, k) for k in static)
    # Configs that differ only in data settings share one skeleton: one set of programs.
    _, changes = CASES[name]
    assert set(changes) <= data
    assert dataclasses.replace(config, **changes).skeleton() == skeleton


@pytest.fixture(scope="module")
def tiny(tiny_unlearning):
    """The seed-0 run of `tiny_unlearning` (tests/conftest.py)."""
    t = tiny_unlearning
    return dict(model=t["model"], data=t["data"], original=t["originals"][0], splits=t["splits"][0])


def run_pair(tiny, configs):
    """Two members (seeds 0 and 1, the same split) with `configs`, as one population."""
    out = methods.run_population(
        list(configs),
        tiny["model"],
        [tiny["original"]] * 2,
        data=tiny["data"],
        splits=[tiny["splits"]] * 2,
        seeds=[0, 1],
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
    return all(np.array_equal(p, q) for p, q in zip(x, y, strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_other_values_compile_nothing_and_members_keep_their_own(tiny, name):
    settings, changes = CASES[name]
    a = methods.get(name, **settings)
    b = dataclasses.replace(a, **changes)
    aa = run_pair(tiny, [a, a])  # compiles what the method needs
    engines = list(runner._ENGINES)
    timer = engine.Timer()
    ab = run_pair(tiny, [a, b])
    bb = run_pair(tiny, [b, b])
    assert timer.programs == {}, timer.programs
    assert list(runner._ENGINES) == engines
    assert same(ab[0], aa[0]) and same(ab[1], bb[1])
    assert not same(ab[1], aa[1]) and not same(bb[0], aa[0])
