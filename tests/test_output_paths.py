"""File-system faults where a study writes: a full disk, a file or folder in the way, a path too
long for Orbax. Each is exit 2 and one `error:` line naming the path and the OS error; the
paths are checked before training, and a full disk at the plots still leaves results.json.

Which study a work dir holds: the default work dir is named after the settings that change
results, and a work dir holding another study's results is refused, naming the settings.

A full disk is simulated in the main job's own process: `os.fsync` raises ENOSPC for the temp
file of the one output named (the atomic writer fsyncs before renaming).
"""

import errno
import json
import os
import re
import shutil
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


# -- which study a work dir holds ----------------------------------------------------------------


def parse(*argv):
    from experiments.cli import config_from_args
    from experiments.unlearn import build_parser

    return config_from_args(build_parser().parse_args([str(a) for a in argv]))


@pytest.mark.parametrize(
    "change",
    [
        ("--seeds", "0,1"),
        ("--forget-class", "1"),
        ("--original-epochs", "3"),
        ("--batch-size", "16"),
        ("--no-relearn",),
        ("--methods", "camu,ft"),
        ("--camu-epochs", "7"),
        ("--set", "camu.rep_sample=0.4"),
        ("--scenario", "random"),
    ],
)
def test_another_setting_gets_another_default_workdir(change):
    base, other = parse(), parse(*change)
    assert re.fullmatch(r"runs/digits-class0-[0-9a-f]{8}", base.workdir), base.workdir
    assert other.workdir != base.workdir, change
    # The default studies share one checkpoint folder: the models they share train once.
    assert base.checkpoint_dir == other.checkpoint_dir == "runs/checkpoints"


def test_the_same_study_gets_the_same_default_workdir():
    base = parse("--methods", "camu,ft", "--set", "ft.learning_rate=0.05")
    assert parse("--methods", "ft,camu", "--set", "ft.learning_rate=0.05").workdir == base.workdir
    # How a study runs and where its files go do not change its results, nor its work dir.
    same = parse(
        "--methods", "camu,ft", "--set", "ft.learning_rate=0.05", "--population-size", "1",
        "--eval-workers", "1", "--checkpoint-every", "5", "--no-progress", "--on-divergence",
        "stop", "--forget-fraction", "0.3",  # the random scenario's, unused here
    )  # fmt: skip
    assert same.workdir == base.workdir
    assert parse("--methods", "camu,ft").workdir != base.workdir
    names = {
        parse(*args).workdir.split("/")[1].rsplit("-", 1)[0]
        for args in [(), ("--forget-class", "all"), ("--forget-class", "0,1"),
                     ("--scenario", "random"), ("--dataset", "mnist")]
    }  # fmt: skip
    assert names == {"digits-class0", "digits-class-all", "digits-class0+1", "digits-random10",
                     "mnist-class0"}  # fmt: skip
    # An explicit --workdir is taken as given, its checkpoints inside it.
    explicit = parse("--workdir", "elsewhere")
    assert (explicit.workdir, explicit.checkpoint_dir) == ("elsewhere", None)


def test_a_results_file_records_the_settings_its_config_has(checkpoints):
    """What the refusal compares: the settings of a config and of its results.json agree."""
    from experiments.outputs import recorded_settings, settings_of

    workdir = checkpoints.parent / "wd"
    config = parse(*FAST, "--workdir", workdir, "--checkpoint-dir", checkpoints)
    assert recorded_settings(workdir) == settings_of(config)
    assert recorded_settings(workdir)["study"]["original_epochs"] == 1


def test_a_workdir_with_another_studys_results_is_refused(tmp_path, checkpoints):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    kept = (checkpoints.parent / "wd" / "results.json").read_bytes()
    (workdir / "results.json").write_bytes(kept)
    args = ("--workdir", workdir, "--checkpoint-dir", checkpoints)
    proc = run_main(*args, "--camu-epochs", "3", "--seeds", "0,1")
    line = assert_one_line_error(
        proc,
        f"--workdir {workdir} holds the results of another study",
        "seeds: [0] there, [0, 1] here",
        "camu.epochs: ",
        " there, 3 here",
        "--overwrite",
    )
    assert "leave it out (this study's own is runs/digits-class0-" in line
    assert (workdir / "results.json").read_bytes() == kept
    assert sorted(p.name for p in workdir.iterdir()) == ["results.json"]  # nothing written
    # --overwrite replaces them (the original and retrained models restored, not trained).
    proc = run_main(*args, "--camu-epochs", "3", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"work dir: {workdir}\n" in proc.stdout
    results = json.loads((workdir / "results.json").read_text())
    assert results["config"]["camu"]["epochs"] == 3 and results["phases"][0]["restored"]


def test_a_results_file_of_no_study_is_not_guarded(tmp_path):
    from experiments.outputs import check_workdir_study, settings_of

    settings = settings_of(parse())
    for text in ('{"keep": true}', "earlier results", "[1, 2]"):
        (tmp_path / "results.json").write_text(text)
        check_workdir_study(tmp_path, settings)  # nothing of a study to keep: no error


def test_rerunning_or_resuming_the_same_study_in_its_workdir_works(tmp_path, checkpoints):
    workdir = tmp_path / "wd"
    shutil.copytree(checkpoints.parent / "wd", workdir)
    (workdir / "results.json").unlink()  # a run killed before its results: config.toml, splits
    args = ("--workdir", workdir, "--checkpoint-dir", checkpoints)
    for _ in range(2):  # resumed, then rerun over its own results
        proc = run_main(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((workdir / "results.json").read_text())["phases"][0]["restored"]
