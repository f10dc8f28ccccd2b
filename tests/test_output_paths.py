"""File-system faults where a study writes: a full disk, a file or folder in the way, a path too
long for Orbax. Each is exit 2 and one `error:` line naming the path and the OS error; the
paths are checked before training, and a full disk at the plots still leaves results.json.

A full disk is simulated in the main job's own process: `os.fsync` raises ENOSPC for the temp
file of the one output named (the atomic writer fsyncs before renaming).
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error

from experiments import reporting

ROOT = Path(__file__).resolve().parents[1]
FAST = ("--no-progress", "--original-epochs", "1", "--no-relearn")

# Runs `experiments.unlearn.main(argv)` with writes to temp files of `target` failing: ENOSPC.
FULL_DISK = """
import errno, os, sys
target, argv = sys.argv[1], sys.argv[2:]
real = os.fsync
def fsync(fd):
    name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    if name.startswith(f".{target}.tmp-"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(fd)
os.fsync = fsync
from experiments.unlearn import main
sys.exit(main(argv))
"""


def run_main(*args, full=None):
    command = ["-m", "experiments.unlearn"] if full is None else ["-c", FULL_DISK, full]
    return subprocess.run(
        [sys.executable, *command, *FAST, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1200,
    )


def no_temp_files(workdir: Path) -> bool:
    return not [p for p in workdir.rglob("*.tmp") if p.is_file()]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A checkpoint dir holding the trained original and retrained digits models, so the
    runs below restore them instead of training again."""
    root = tmp_path_factory.mktemp("ckpt")
    proc = run_main("--workdir", root / "wd", "--checkpoint-dir", root / "checkpoints")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "checkpoints"


# -- the atomic writer -------------------------------------------------------------------------


def test_atomic_write_names_the_path_on_a_full_disk(tmp_path, monkeypatch):
    from experiments import outputs

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(reporting.os, "fsync", full)
    target = tmp_path / "results.json"
    with pytest.raises(OSError) as err:
        reporting.atomic_write_bytes(target, b"{}")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert outputs.os_error_line(err.value) == (
        f"{target}: cannot be written (No space left on device)"
    )
    assert list(tmp_path.iterdir()) == []  # The temp file is gone.


# -- a full disk -------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["results.json", "splits"])
def test_full_disk_at_results_or_splits(tmp_path, checkpoints, target):
    workdir = tmp_path / "wd"
    name = "class-0-seed0.npz" if target == "splits" else target
    proc = run_main("--workdir", workdir, "--checkpoint-dir", checkpoints, full=name)
    path = workdir / "splits" / name if target == "splits" else workdir / name
    assert_one_line_error(proc, f"{path}: cannot be written (No space left on device)")
    assert not path.exists() and no_temp_files(workdir)


def test_full_disk_at_a_plot_still_writes_results_json(tmp_path, checkpoints):
    workdir = tmp_path / "wd"
    proc = run_main(
        "--workdir", workdir, "--checkpoint-dir", checkpoints, full="per_class_accuracy.png"
    )
    line = assert_one_line_error(
        proc,
        f"{workdir / 'per_class_accuracy.png'}: cannot be written (No space left on device)",
        f"python -m experiments.report {workdir}",
    )
    assert "results.json is written" in line
    assert json.loads((workdir / "results.json").read_text())["runs"]
    assert (workdir / "results.md").is_file() and no_temp_files(workdir)


# -- a path in the way, found before training ---------------------------------------------------


def _assert_refused_before_training(tmp_path, proc, *needles):
    assert_one_line_error(proc, *needles)
    # Nothing trained or saved: the checkpoint folders were never made.
    assert not (tmp_path / "wd" / "checkpoints").exists()


def test_splits_is_a_file(tmp_path):
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "splits").write_text("keep")
    proc = run_main("--workdir", tmp_path / "wd")
    _assert_refused_before_training(tmp_path, proc, tmp_path / "wd" / "splits", "is a file")
    assert (tmp_path / "wd" / "splits").read_text() == "keep"


def test_results_json_is_a_directory(tmp_path):
    (tmp_path / "wd" / "results.json").mkdir(parents=True)
    proc = run_main("--workdir", tmp_path / "wd")
    _assert_refused_before_training(
        tmp_path, proc, tmp_path / "wd" / "results.json", "is a directory"
    )


def test_a_checkpoint_folder_replaced_by_a_file(tmp_path, checkpoints):
    (folder,) = (checkpoints / "original").iterdir()
    ckpt = tmp_path / "checkpoints"
    (ckpt / "original").mkdir(parents=True)
    (ckpt / "original" / folder.name).write_text("not a checkpoint")
    proc = run_main("--workdir", tmp_path / "wd", "--checkpoint-dir", ckpt)
    assert_one_line_error(proc, ckpt / "original" / folder.name, "where a checkpoint folder")
    assert not (tmp_path / "wd").exists() and not (ckpt / "retrain").exists()


def test_a_workdir_too_long_for_orbax(tmp_path):
    # Short enough to create (and for the writability check), too long for Orbax's files.
    workdir = tmp_path
    while len(str(workdir)) < 3900:
        workdir /= "d" * 100
    proc = run_main("--workdir", workdir)
    assert_one_line_error(proc, "is too long", "choose a shorter --workdir")
    assert list(tmp_path.iterdir()) == []
