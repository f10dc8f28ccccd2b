"""Sharded (8 fake CPU devices) == single device, in a separate process."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(run_script):
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    return run_script("sharded_vs_single.py", env=flags, timeout=900)


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
