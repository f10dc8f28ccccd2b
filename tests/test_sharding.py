"""Sharded (8 fake CPU devices) == single device, in a separate process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multidevice" / "sharded_vs_single.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eight_devices(report):
    assert report["devices"] == 8


def test_camu_step_sharded_equals_single(report):
    assert report["batch_sharded"] in ("P('data',)", "PartitionSpec('data',)")
    assert report["camu_step"] < 1e-5
    assert report["camu_step_bn"] < 1e-5
    assert report["camu_step_loss"] < 1e-5


def test_loops_sharded_equal_single(report):
    assert report["train_loop"] < 1e-5
    assert report["camu_loop"] < 1e-5


def test_indivisible_batch_is_refused(report):
    msg = report["indivisible_error"]
    assert msg is not None and "12" in msg and "8 devices" in msg
