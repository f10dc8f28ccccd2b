"""Run in its own process (float64); prints JSON with max differences.

A method's population member must compute its sequential run: boundary shrink / expand, UNSIR,
Bad Teacher and SCRUB, three members each (seeds 0, 1, 2 forgetting digits classes 0, 1, 2 from
untrained originals), run one at a time and all together (one CPU device: the population's
convolutions become patch matmuls, a different summation order). float64 makes the comparison
about the function each program computes, not about float32 summation order
(tests/test_methods_teachers.py derives the bounds). Arguments: method names (default all).
"""

import os

os.environ["JAX_ENABLE_X64"] = "1"

import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from camu_jax import methods, sharding  # noqa: E402
from camu_jax.data import ForgetSpec, input_spec_for, load_dataset, make_splits  # noqa: E402
from camu_jax.data.pipeline import DeviceData  # noqa: E402
from camu_jax.methods.unsir import error_maximising_noise  # noqa: E402
from camu_jax.models import (
    create_model,  # noqa: E402
    init_variables,  # noqa: E402
)

SEEDS = (0, 1, 2)
CLASSES = (0, 1, 2)
# Short runs with the methods' own optimizers; learning rates large enough to move every
# member well beyond the comparison bounds.
CONFIGS = {
    "boundary_shrink": dict(epochs=2, learning_rate=0.01, bound=0.25),
    "boundary_expand": dict(epochs=2, learning_rate=0.01),
    "unsir": dict(
        noise_size=32, noise_steps=5, noise_repeats=2, retain_per_class=20, batch_size=64
    ),
    "bad_teacher": dict(epochs=1, learning_rate=1e-3, batch_size=64, retain_fraction=0.3),
    "scrub": dict(epochs=2, msteps=1, learning_rate=0.01, forget_batch_size=128, batch_size=128),
}


def f64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def diff(a, b):
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    return {
        "abs": float(max(np.max(np.abs(np.asarray(x) - np.asarray(y))) for x, y in pairs)),
        "scale": float(max(np.max(np.abs(np.asarray(x))) for x, _ in pairs)),
    }


def noise_diff(method, model, data, originals, splits):
    """Max difference of UNSIR's noise (prepare) computed for all members at once and alone."""
    ctxs = [
        methods.MemberContext(s, sp, data.host_labels, 10, {})
        for s, sp in zip(SEEDS, splits, strict=True)
    ]
    arrays = [method.member_arrays(c) for c in ctxs]
    labels = np.stack([a["noise_y"] for a in arrays])
    keys = np.stack([a["unsir_key"] for a in arrays])
    kw = dict(steps=method.noise_steps, learning_rate=method.noise_lr, weight=method.noise_weight)

    def noise(idx):
        stacked = jax.tree.map(lambda *x: np.stack(x), *[originals[i] for i in idx])
        placed = sharding.shard_members(stacked, data.mesh)
        return np.asarray(error_maximising_noise(model, placed, data, labels[idx], keys[idx], **kw))

    together = noise([0, 1, 2])
    return [float(np.max(np.abs(together[i] - noise([i])[0]))) for i in range(3)]


def main():
    assert jax.config.jax_enable_x64
    names = sys.argv[1:] or list(CONFIGS)
    d = load_dataset("digits", progress=False)
    spec = input_spec_for("digits", "cnn")
    model = create_model("cnn", num_classes=10)
    one = DeviceData.put(
        d.train_images, d.train_labels, spec=spec, mesh=sharding.make_mesh(jax.devices()[:1])
    )
    originals = [f64(init_variables(model, jax.random.key(s), one.input_shape)) for s in SEEDS]
    splits = [
        make_splits(d.train_labels, ForgetSpec(kind="class", classes=(c,)), seed=s, num_classes=10)
        for s, c in zip(SEEDS, CLASSES, strict=True)
    ]
    out = {"forget_sizes": [int(s.forget.size) for s in splits]}
    for name in names:
        t0 = time.time()
        method = methods.get(name, **CONFIGS[name])
        kw = dict(num_classes=10, progress=False)
        seq = [
            methods.run_population(method, model, [o], data=one, splits=[sp], seeds=[s], **kw)[0]
            for o, sp, s in zip(originals, splits, SEEDS, strict=True)
        ]
        pop = methods.run_population(
            method, model, originals, data=one, splits=splits, seeds=SEEDS, **kw
        )
        out[name] = {
            "diff": [diff(r[0], s[0]) for r, s in zip(pop, seq, strict=True)],
            "moved": [diff(s[0], o) for s, o in zip(seq, originals, strict=True)],
            "steps": [s[1]["steps"] for s in seq],
            "config": dataclasses.asdict(method),
        }
        if name == "unsir":
            out[name]["noise_diff"] = noise_diff(method, model, one, originals, splits)
        print(name, json.dumps(out[name]), time.time() - t0, file=sys.stderr, flush=True)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
