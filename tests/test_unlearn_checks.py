"""The main job checks every setting before it trains or writes anything, and what the sets
cannot support is known before training (issue 8, items 2, 3, 5, 6)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHEAP = ("--no-progress", "--original-epochs", "1", "--no-relearn")


def run_main(*args, devices=None):
    env = dict(os.environ)
    if devices:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} " + (
            f"--xla_force_host_platform_device_count={devices}"
        )
    return subprocess.run(
        [sys.executable, "-m", "experiments.unlearn", *CHEAP, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=1200,
    )


def written(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--camu-epochs", "-1"), "CaMU epochs must be a positive integer, got -1"),
        (("--camu-epochs", "0"), "CaMU epochs must be a positive integer, got 0"),
        (("--kl-lr", "nan"), "CaMU kl_lr must be a positive finite number, got nan"),
        (("--impair-lr", "inf"), "CaMU impair_lr must be a positive finite number, got inf"),
        (("--camu-kl-lr", "-0.1"), "CaMU kl_lr must be a positive finite number, got -0.1"),
        (("--camu-batch-size", "0"), "CaMU batch_size must be a positive integer, got 0"),
        (("--camu-weight-decay", "nan"), "CaMU weight_decay must be a non-negative"),
        (("--camu-rep-forget", "-0.5"), "CaMU coefficient rep_forget"),
        (("--learning-rate", "0"), "learning rate must be a positive finite number, got 0.0"),
    ],
)
def test_bad_setting_exits_2_naming_it_and_writes_nothing(tmp_path, args, needle):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    (workdir / "results.json").write_text('{"keep": true}')
    proc = run_main("--workdir", str(workdir), *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr, proc.stderr[-2000:]
    assert written(workdir) == ["results.json"]
    assert (workdir / "results.json").read_text() == '{"keep": true}'


def test_camu_batch_not_divisible_by_devices_is_refused_before_training(tmp_path):
    # One run at a time: the 3 devices split each batch (a population puts whole members on
    # devices instead, where any batch size goes).
    workdir = tmp_path / "wd"
    proc = run_main(
        "--workdir", str(workdir), "--batch-size", "33", "--camu-batch-size", "32",
        "--population-size", "1", devices=3,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "CaMU batch size 32 is not divisible by the 3 devices" in proc.stderr, proc.stderr
    assert written(workdir) == []  # no checkpoint, no split file


def test_batch_size_reaches_camu_on_three_devices(tmp_path):
    """Issue 8 item 2: `--batch-size 33` on 3 devices used to train and save the original and the
    retrained model, then fail in CaMU at its own batch of 32."""
    workdir = tmp_path / "wd"
    proc = run_main("--workdir", str(workdir), "--batch-size", "33", devices=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert len(results["devices"]) == 3
    config = results["config"]
    assert config["batch_size"] == 33 and config["camu"]["batch_size"] == 33
    assert config["camu"]["epochs"] == 2 and config["camu"]["coefficients"]["out_forget"] == 0.01


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("float.npy", np.arange(40) + 0.5, "holds float64 values"),
        ("matrix.npy", np.arange(40).reshape(4, 10), "shape (4, 10)"),
        ("halves.txt", "1\n2.5\n", "2.5"),
    ],
)
def test_bad_forget_index_file_is_refused(tmp_path, name, content, needle):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        np.save(path, content)
    workdir = tmp_path / "wd"
    proc = run_main(
        "--workdir", str(workdir), "--scenario", "indices", "--forget-indices", str(path)
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(path) in proc.stderr and needle in proc.stderr, proc.stderr[-2000:]
    assert written(workdir) == []


def test_tiny_forget_set_finishes_with_the_attack_marked_not_applicable(tmp_path):
    """Issue 8 item 6: 3 forget items used to train both models, then exit 2 in loss_attack."""
    path = tmp_path / "idx.txt"
    path.write_text("5\n17\n230\n")
    workdir = tmp_path / "wd"
    proc = run_main(
        "--workdir", str(workdir), "--scenario", "indices", "--forget-indices", str(path)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Said before any training output (after the line naming the work dir).
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("work dir: "), proc.stdout[:500]
    assert lines[1].startswith("note: loss_attack not applicable"), proc.stdout[:500]
    (run,) = json.loads((workdir / "results.json").read_text())["runs"]
    assert run["split_sizes"]["forget"] == 3
    assert set(run["not_applicable"]) == {"loss_attack"}
    assert ">= 10" in run["not_applicable"]["loss_attack"]
    for method, r in run["methods"].items():
        assert r["loss_attack"] is None, method
        assert r["mia"] is not None and r["mia_efficacy"] is not None, method
