"""Run as one of two processes (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES=2`,
`JAX_PROCESS_ID`, one CPU device each; started by tests/test_multiprocess.py); prints JSON.

Four models (untrained CNNs, seeds 10..13, each forgetting another digit) are evaluated on a
`(member 2, data 1)` mesh over both processes' devices. Reported: which models this process
scored (only those it owns: it holds their logits), the scores it got back for all four, and
float64 rows gathered from both processes (as bit patterns: the gather must be exact).
"""

import json
import sys

import jax
import numpy as np

from camu_jax import evaluation, sharding
from camu_jax.data import ForgetSpec, input_spec_for, load_dataset, make_splits
from camu_jax.data.pipeline import DeviceData
from camu_jax.models import create_model, init_variables

SEEDS = (10, 11, 12, 13)


def main():
    sharding.maybe_initialize_distributed()
    assert jax.process_count() == 2 and jax.local_device_count() == 1
    me = jax.process_index()
    mesh = sharding.make_mesh(member_devices=2)
    owners = sharding.member_owners(mesh, len(SEEDS))

    # Values float32 cannot hold: a third, a float64 subnormal, NaN.
    rows = {i: [i / 3, 1e-310, np.nan] for i in range(len(SEEDS)) if owners[i] == me}
    gathered = sharding.gather_rows(rows, owners, 3)

    d = load_dataset("digits", progress=False)
    spec = input_spec_for("digits", "cnn")
    train = DeviceData.put(d.train_images, d.train_labels, spec=spec, mesh=mesh)
    test = DeviceData.put(d.test_images, d.test_labels, spec=spec, mesh=mesh)
    model = create_model("cnn", num_classes=10)
    classes = [(s % 10,) for s in SEEDS]
    scored = []
    score = evaluation.score

    def counting_score(**job):
        scored.append(job["seed"])
        return score(**job)

    evaluation.score = counting_score  # `evaluate` looks it up per call (workers=1)
    scores = evaluation.evaluate(
        model,
        [init_variables(model, jax.random.key(s), train.input_shape) for s in SEEDS],
        train=train,
        test=test,
        splits=[
            make_splits(d.train_labels, ForgetSpec(kind="class", classes=c), seed=s, num_classes=10)
            for s, c in zip(SEEDS, classes, strict=True)
        ],
        forget_classes=classes,
        seeds=SEEDS,
        workers=1,
    )
    json.dump(
        {
            "process": me,
            "owners": owners,
            "gathered": gathered.view(np.uint64).tolist(),
            "scored": scored,
            # Bit patterns, so NaN compares equal and nothing is rounded on the way.
            "scores": [
                {k: np.float64(v).view(np.uint64).item() for k, v in s.items()} for s in scores
            ],
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
