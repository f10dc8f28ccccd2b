"""Shared pytest fixtures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Real datasets for offline work live beside the checkout (see ../shared/data/README.md).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; skips (saying what is missing) where it is absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(
            f"shared real-data folder {SHARED_DATA} is absent (CI provides it beside the "
            "checkout as ../shared/data; on a dev machine copy or link it there)"
        )
    return SHARED_DATA


def _run_script(name: str, *args, env: dict | None = None, timeout: int = 1500) -> dict:
    """Runs `tests/multidevice/<name>` in its own CPU process (the checkout first on the path;
    `env` adds variables, e.g. XLA_FLAGS for fake devices) and returns the JSON object its last
    stdout line holds."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multidevice" / name), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **(env or {})},
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def run_script():
    """`run_script(name, *args, env=None, timeout=1500) -> dict`: a tests/multidevice script's
    JSON report (`_run_script`)."""
    return _run_script


@pytest.fixture(scope="session")
def random_images_96():
    """96 random 8x8 uint8 images with labels 0..9, on device over every device: the training
    and checkpoint tests' small problem."""
    import numpy as np

    from camu_jax import sharding
    from camu_jax.data.pipeline import DeviceData, InputSpec

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (96, 8, 8, 1)).astype(np.uint8)
    labels = rng.integers(0, 10, 96).astype(np.int32)
    return DeviceData.put(images, labels, spec=InputSpec(), mesh=sharding.make_mesh())


@pytest.fixture(scope="session")
def tiny_unlearning():
    """96 random 8x8 images, an untrained digits CNN per seed (0, 1) and class 0 forgotten per
    seed: a few steps per method (`originals[i]`, `splits[i]` of seed i)."""
    import jax
    import numpy as np

    from camu_jax import sharding
    from camu_jax.data.pipeline import DeviceData, InputSpec
    from camu_jax.data.splits import ForgetSpec, make_splits
    from camu_jax.models import create_model, init_variables

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (96, 8, 8, 1)).astype(np.uint8)
    labels = rng.integers(0, 10, 96).astype(np.int32)
    data = DeviceData.put(images, labels, spec=InputSpec(), mesh=sharding.make_mesh())
    model = create_model("cnn", num_classes=10)
    seeds = (0, 1)
    return dict(
        model=model,
        data=data,
        originals=[init_variables(model, jax.random.key(s), data.input_shape) for s in seeds],
        splits=[
            make_splits(labels, ForgetSpec(kind="class", classes=(0,)), seed=s, num_classes=10)
            for s in seeds
        ],
    )
