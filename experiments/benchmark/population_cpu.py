"""On a CPU: MNIST CNN training as the main job runs it (one XLA device per core), one run at a
time (`--population-size 1`: the batch split over the devices) against a population of three
(members sharded over the devices). Prints member-steps per second of each and their ratio.

    python -m experiments.benchmark.population_cpu [--manual-dir ../shared/data/mnist]

Each mode runs in its own process (the device count and convolution form are fixed at start);
`train_population` runs 3 x 400 steps three times, the first (compilation) is dropped, the
median of the rest is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

STEPS = 400  # per member and repetition
SEEDS = (0, 1, 2)


def _measure(mode: str, manual_dir: str | None) -> dict:
    import jax
    import numpy as np

    from camu_jax import sharding
    from camu_jax.data import input_spec_for, load_dataset
    from camu_jax.data.pipeline import DeviceData
    from camu_jax.models import create_model, init_variables
    from camu_jax.training import TrainConfig, train_population

    d = load_dataset("mnist", manual_dir=manual_dir, progress=False)
    members = 1 if mode == "sequential" else len(jax.devices())
    mesh = sharding.make_mesh(jax.devices(), member_devices=members)
    spec = input_spec_for("mnist", "cnn")
    train = DeviceData.put(d.train_images, d.train_labels, spec=spec, mesh=mesh)
    model = create_model("cnn", num_classes=10)
    inits = [init_variables(model, jax.random.key(s), train.input_shape) for s in SEEDS]
    items = [np.arange(32 * STEPS) + 1000 * s for s in SEEDS]
    seconds = []
    for _ in range(3):
        t = time.perf_counter()
        train_population(
            model, inits, data=train, items=items, seeds=SEEDS, config=TrainConfig(epochs=1),
            population_size=1 if mode == "sequential" else None, progress=False,
        )  # fmt: skip
        seconds.append(time.perf_counter() - t)
    warm = float(np.median(seconds[1:]))
    return {
        "mode": mode,
        "devices": len(jax.devices()),
        "seconds": seconds,
        "member_steps_per_s": len(SEEDS) * STEPS / warm,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark.population_cpu")
    p.add_argument("--manual-dir", default=None, help="MNIST source files (TFDS manual dir)")
    p.add_argument("--mode", choices=("sequential", "population"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(_measure(args.mode, args.manual_dir)))
        return 0
    cores = len(os.sched_getaffinity(0))
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={cores}",
    }
    out = {}
    for mode in ("sequential", "population"):
        cmd = [sys.executable, "-m", f"{__package__}.population_cpu", "--mode", mode]
        if args.manual_dir:
            cmd += ["--manual-dir", args.manual_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(out[mode]))
    ratio = out["sequential"]["member_steps_per_s"] / out["population"]["member_steps_per_s"]
    print(f"one run at a time / population of 3: {ratio:.2f}x member-steps per second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
