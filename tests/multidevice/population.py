"""Run in its own process (8 fake CPU devices, float64); prints JSON with max differences.

A population member must compute its sequential run: CaMU and training populations of three
members (seeds 0, 1, 2 forgetting classes 0, 1, 2 of digits), run one at a time, all together,
in waves of two, sharded over 8 devices, and as scan chunks, must agree. float64 makes the
comparison about the function each program computes, not about float32 summation order (see
test_population.py). Each step is waited for: on jax 0.10.2 a loop over fake devices can
deadlock otherwise.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_ENABLE_X64"] = "1"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from camu_jax import sharding  # noqa: E402
from camu_jax.data import ForgetSpec, input_spec_for, load_dataset, make_splits  # noqa: E402
from camu_jax.data.pipeline import DeviceData  # noqa: E402
from camu_jax.methods.camu import CamuConfig, unlearn, unlearn_population  # noqa: E402
from camu_jax.models import (
    create_model,  # noqa: E402
    init_variables,
)
from camu_jax.training import TrainConfig, train_model, train_population  # noqa: E402

SEEDS = (0, 1, 2)
CLASSES = (0, 1, 2)


def f64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def diff(a, b):
    """Max absolute difference over all leaves, and the largest magnitude (for scale)."""
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    return {
        "abs": float(max(np.max(np.abs(np.asarray(x) - np.asarray(y))) for x, y in pairs)),
        "scale": float(max(np.max(np.abs(np.asarray(x))) for x, _ in pairs)),
    }


def main():
    assert jax.device_count() == 8 and jax.config.jax_enable_x64
    d = load_dataset("digits", progress=False)
    spec = input_spec_for("digits", "cnn")
    model = create_model("cnn", num_classes=10)
    one = DeviceData.put(
        d.train_images, d.train_labels, spec=spec, mesh=sharding.make_mesh(jax.devices()[:1])
    )
    eight = DeviceData.put(
        d.train_images, d.train_labels, spec=spec, mesh=sharding.make_mesh(member_devices=8)
    )
    variables = [f64(init_variables(model, jax.random.key(s), one.input_shape)) for s in SEEDS]
    splits = [
        make_splits(d.train_labels, ForgetSpec(kind="class", classes=(c,)), seed=s, num_classes=10)
        for s, c in zip(SEEDS, CLASSES, strict=True)
    ]
    out = {"forget_sizes": [int(s.forget.size) for s in splits]}

    config = CamuConfig(epochs=2)
    kw = dict(num_classes=10, config=config, progress=False)
    seq = [
        unlearn(model, v, data=one, splits=sp, seed=s, **kw)[0]
        for v, sp, s in zip(variables, splits, SEEDS, strict=True)
    ]
    pops = {
        "population": unlearn_population(
            model, variables, data=one, splits=splits, seeds=SEEDS, **kw
        ),
        "two_waves": unlearn_population(
            model, variables, data=one, splits=splits, seeds=SEEDS, population_size=2, **kw
        ),
        "eight_devices": unlearn_population(
            model, variables, data=eight, splits=splits, seeds=SEEDS, **kw
        ),
        "scan": unlearn_population(
            model, variables, data=one, splits=splits, seeds=SEEDS, use_scan=True,
            chunk_steps=4, **kw,
        ),
    }  # fmt: skip
    out["camu"] = {
        name: [diff(r[0], s) for r, s in zip(res, seq, strict=True)] for name, res in pops.items()
    }
    out["camu_moved"] = [diff(s, v) for s, v in zip(seq, variables, strict=True)]
    out["camu_steps"] = [r[1]["steps"] for r in pops["population"]]

    tconfig = TrainConfig(epochs=1)
    items = [sp.remain for sp in splits]
    tseq = [
        train_model(model, v, data=one, items=it, config=tconfig, seed=s, progress=False)[0]
        for v, it, s in zip(variables, items, SEEDS, strict=True)
    ]
    tkw = dict(items=items, seeds=SEEDS, config=tconfig, progress=False)
    tpops = {
        "population": train_population(model, variables, data=one, **tkw),
        "two_waves": train_population(model, variables, data=one, population_size=2, **tkw),
        "eight_devices": train_population(model, variables, data=eight, **tkw),
        "scan": train_population(model, variables, data=one, use_scan=True, chunk_steps=16, **tkw),
    }
    out["train"] = {
        name: [diff(r[0], s) for r, s in zip(res, tseq, strict=True)] for name, res in tpops.items()
    }
    out["train_steps"] = [-(-len(it) // tconfig.batch_size) for it in items]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
