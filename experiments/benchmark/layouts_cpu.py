"""On a CPU: member-steps per second of the CNN's training in the engine, per layout and step
form, in one process (one XLA device per core, as the main job makes them). The layouts are
those `engine.place` weighs: one member at a time on one device (`--population-size 1`), one
member per device, and a stacked wave; the forms a scanned chunk of steps and one jitted call
per step (`engine.default_use_scan` chooses between them). Prints each rate and the bound it
sets on any population:

    python -m experiments.benchmark.layouts_cpu [--dataset digits] [--stacked 10] [--out F.json]

`bound` is the fastest population rate over the one-at-a-time rate the default path runs: no
phase of steps runs faster than that as a population on this host, whatever it compiles.
Each layout trains `--epochs` epochs of `--items` items per member three times after a warm-up
(compilation) call and reports the median.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

LAYOUTS = ("one_device", "one_per_device", "stacked")
FORMS = ("scan", "loop")


def bound(rates: dict[str, dict[str, float]], default_one: str) -> float:
    """The fastest population layout's member-steps per second over one at a time's, in the
    form the default path runs one at a time (`default_one`)."""
    best = max(
        r for layout, forms in rates.items() if layout != "one_device" for r in forms.values()
    )
    return best / rates["one_device"][default_one]


def _measure(dataset: str, manual_dir, stacked: int, epochs: int, items: int) -> dict:
    import jax
    import numpy as np

    from camu_jax import sharding
    from camu_jax.data import input_spec_for, load_dataset
    from camu_jax.data.pipeline import DeviceData
    from camu_jax.models import create_model, init_variables
    from camu_jax.training import TrainConfig, train_engine, train_population

    d = load_dataset(dataset, manual_dir=manual_dir, progress=False)
    spec = input_spec_for(dataset, "cnn")
    model = create_model("cnn", num_classes=10)
    devices = jax.devices()
    n = len(devices)
    sizes = {"one_device": (1, 1), "one_per_device": (n, n), "stacked": (n, n * stacked)}
    items = min(items, len(d.train_labels))
    rates: dict[str, dict[str, float]] = {}
    for layout, (rows, members) in sizes.items():
        mesh = sharding.make_mesh(devices[:rows], member_devices=rows)
        train = DeviceData.put(d.train_images, d.train_labels, spec=spec, mesh=mesh)
        seeds = list(range(members))
        inits = [init_variables(model, jax.random.key(s), train.input_shape) for s in seeds]
        tables = [np.arange(items)] * members
        steps = epochs * -(-items // 32) * members
        for form in FORMS:
            run = functools.partial(
                train_population, model, inits, data=train, items=tables, seeds=seeds,
                population_size=members, progress=False, use_scan=form == "scan",
            )  # fmt: skip
            run(config=TrainConfig(epochs=1))  # compiles
            seconds = []
            for _ in range(3):
                t = time.perf_counter()
                run(config=TrainConfig(epochs=epochs))
                seconds.append(time.perf_counter() - t)
            rates.setdefault(layout, {})[form] = steps / float(np.median(seconds))
            print(f"{layout} {form}: {rates[layout][form]:.0f} member-steps/s", file=sys.stderr)
    # The form the default path runs one member on one device in: the engine's own decision
    # (`engine.default_use_scan`), read from the engine of a one-epoch run.
    one = sharding.make_mesh(devices[:1], member_devices=1)
    train = DeviceData.put(d.train_images, d.train_labels, spec=spec, mesh=one)
    init = init_variables(model, jax.random.key(0), train.input_shape)
    config = TrainConfig(epochs=1)
    train_population(
        model, [init], data=train, items=[np.arange(items)], seeds=[0], config=config,
        population_size=1, progress=False,
    )  # fmt: skip
    scans = train_engine(model, config, spec, one).scans(1)
    default_one = "scan" if scans else "loop"
    return {
        "dataset": dataset,
        "devices": n,
        "members": {k: v[1] for k, v in sizes.items()},
        "member_steps_per_s": rates,
        "default_one_at_a_time": default_one,
        "bound": bound(rates, default_one),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark.layouts_cpu")
    p.add_argument("--dataset", default="digits", choices=("digits", "mnist", "fashion_mnist"))
    p.add_argument("--manual-dir", default=None, help="MNIST-like source files (TFDS manual dir)")
    p.add_argument("--stacked", type=int, default=10, help="members per device, stacked layout")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--items", type=int, default=1437, help="training items per member")
    p.add_argument("--out", default=None, help="write the JSON record here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker:
        cores = len(os.sched_getaffinity(0))
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={cores}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    out = _measure(args.dataset, args.manual_dir, args.stacked, args.epochs, args.items)
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
