"""Run in its own process with two fake CPU devices (the main job's layout on a 2-core CPU);
prints JSON: the placements `engine.place` chooses and those a study records in results.json.

Nothing here is timed: the timed probe is given fixed timings, so its choice is checked as a
rule (the faster candidate in member-steps per second wins).
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

from camu_jax import engine, sharding  # noqa: E402


def fake_probe(
    stacked_s: float, single_s: float, calls: list, one_s=None, compile_s=1.0, wave_s=0.0
):
    """A probe whose step of a stacked wave takes `stacked_s`, of one member per device
    `single_s` and of one member on one device `one_s` (default `single_s`); 100 MiB a member;
    every program compiled in `compile_s`; every wave's member data built in `wave_s`."""

    def probe(mesh, size, timed):
        rows = sharding.member_devices(mesh)
        calls.append((rows, size, timed))
        if not timed:
            return 100 * 2**20, None, compile_s, wave_s
        if rows == 1 and size == 1 and one_s is not None:
            return 100 * 2**20, one_s, compile_s, wave_s
        return 100 * 2**20, (single_s if size == rows else stacked_s), compile_s, wave_s

    return probe


def step_forms() -> dict:
    """Which step form (`engine.default_use_scan`) the CNN's training takes per layout: 8x8
    images (digits: patch-matrix products, no XLA convolution) and 28x28 (MNIST: XLA
    convolutions for one member a device); one epoch of 64 random items per member."""
    import numpy as np

    from camu_jax.data.pipeline import DeviceData, InputSpec
    from camu_jax.models import create_model, init_variables
    from camu_jax.training import TrainConfig, train_engine, train_population

    model = create_model("cnn", num_classes=10)
    config = TrainConfig(epochs=1)
    rng = np.random.default_rng(0)
    forms = {}
    for side in (8, 28):
        images = rng.integers(0, 256, (64, side, side, 1)).astype(np.uint8)
        labels = np.arange(64) % 10
        for name, rows, members in (("one_device", 1, 1), ("per_device", 2, 2), ("stacked", 2, 4)):
            mesh = sharding.make_mesh(jax.devices()[:rows], member_devices=rows)
            data = DeviceData.put(images, labels, spec=InputSpec(), mesh=mesh)
            inits = [
                init_variables(model, jax.random.key(s), data.input_shape) for s in range(members)
            ]
            train_population(
                model, inits, data=data, items=[np.arange(64)] * members,
                seeds=list(range(members)), config=config, population_size=members,
                progress=False,
            )  # fmt: skip
            scans = train_engine(model, config, InputSpec(), mesh).scans(members)
            forms[f"{side}_{name}"] = "scan" if scans else "loop"
    return forms


def main():
    assert jax.device_count() == 2
    mesh = sharding.make_mesh(member_devices=2)
    out = {}
    quiet = {"log": None}
    out["one"] = engine.place(None, 1, mesh, fake_probe(1.0, 1.0, []), **quiet).record()
    out["one_requested_1"] = engine.place(1, 1, mesh, **quiet).record()
    out["five_requested_1"] = engine.place(1, 5, mesh, **quiet).record()
    out["two"] = engine.place(None, 2, mesh, **quiet).record()
    out["three_unprobed"] = engine.place(None, 3, mesh, **quiet).record()
    # 10 members, 1000 member-steps, every program compiled in 1 s. One at a time (1 s a
    # step: a 1000 s run) could save 500 s spread and all of it stacked: all three are timed.
    # Stacked, 10 in 2 s, is 5 member-steps/s against 2 / 1 s = 2 spread and 1 one at a time.
    calls = []
    fast = engine.place(None, 10, mesh, fake_probe(2.0, 1.0, calls), steps=1000, **quiet)
    out["ten_stacked_faster"], out["ten_stacked_faster_calls"] = fast.record(), calls
    calls = []  # ... 10 / 8 s = 1.25 is not
    slower = engine.place(None, 10, mesh, fake_probe(8.0, 1.0, calls), steps=1000, **quiet)
    out["ten_stacked_slower"] = slower.record()
    out["ten_stacked_slower_calls"] = calls
    out["ten_stacked_slower_mesh"] = [str(d) for d in slower.mesh.devices.flat]
    # 100 steps of 10 ms one at a time (1 s) can repay no 1 s compile: nothing else is timed
    calls = []
    short = engine.place(None, 10, mesh, fake_probe(0.01, 0.01, calls, 0.01), steps=100, **quiet)
    out["ten_short"], out["ten_short_calls"] = short.record(), calls
    # 600 steps (6 s): spreading could save 3 s, more than another layout's compile may cost
    # (2.3 x 1 s, `engine.OTHER_LAYOUT_COMPILE_RATIO`), and is timed (2 / 30 ms: slower, 67/s);
    # stacking, at most the 6 s, too (10 / 0.2 s = 50/s): one at a time (100/s) stays
    calls = []
    ten_one = engine.place(None, 10, mesh, fake_probe(0.2, 0.03, calls, 0.01), steps=600, **quiet)
    out["ten_one_device"], out["ten_one_device_calls"] = ten_one.record(), calls
    # ... but where each wave costs 0.5 s to build (the teachers' passes), 10 waves one at a
    # time (5 s) lose to 1 stacked wave: 0.5 + 300 x 0.2 / 10 = 6.5 s against 3 + 5 = 8 s
    # (300 steps: spreading could save 4 s, stacking 7.5 s; both timed)
    calls = []
    probe = fake_probe(0.2, 0.03, calls, 0.01, wave_s=0.5)
    out["ten_costly_waves"] = engine.place(None, 10, mesh, probe, steps=300, **quiet).record()
    # Compiling ahead (nothing timed): the layout a timed phase tries first, compiled alone
    calls = []
    ahead = engine.place(
        None, 10, mesh, fake_probe(2.0, 1.0, calls), steps=1000, ahead=True, **quiet
    )
    out["ten_ahead"], out["ten_ahead_calls"] = ahead.record(), calls
    # Without the step count (no timing possible), the memory rule alone: one wave of all
    out["ten_untimed"] = engine.place(None, 10, mesh, fake_probe(2.0, 1.0, []), **quiet).record()
    # Two members, two devices: spread only when it can pay back its compile (2.3 x 1 s here).
    # 100 steps of 10 ms one at a time could save at most 0.5 s: one device, no probe of two.
    calls = []
    short = engine.place(None, 2, mesh, fake_probe(0, 0.012, calls, 0.01), steps=100, **quiet)
    out["two_short"], out["two_short_calls"] = short.record(), calls
    # 1000 steps could save 5 s: both timed; 2 / 12 ms = 167 member-steps/s beats 1 / 10 ms
    calls = []
    long = engine.place(None, 2, mesh, fake_probe(0, 0.012, calls, 0.01), steps=1000, **quiet)
    out["two_long"], out["two_long_calls"] = long.record(), calls
    # ... and 2 / 30 ms = 67 does not
    slow = engine.place(None, 2, mesh, fake_probe(0, 0.03, [], 0.01), steps=1000, **quiet)
    out["two_long_slow"] = slow.record()
    try:
        engine.place(None, 0, mesh, **quiet)
        out["zero_error"] = None
    except ValueError as e:
        out["zero_error"] = str(e)

    out["step_forms"] = step_forms()

    # A whole study of one run, as `python -m experiments.unlearn` runs it on two CPU devices:
    # every phase's recorded placement.
    from experiments.configs import ExperimentConfig
    from experiments.run import run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        config = ExperimentConfig(
            original_epochs=1, relearn=True, workdir=tmp, progress=False, eval_workers=1
        )
        results = run_experiment(config, log=lambda *_: None)
    out["study_mesh"] = results["mesh"]
    out["study_phases"] = {p["phase"]: p["placement"] for p in results["phases"]}
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
