"""Damaged source files, unusable directories and stale temp files: clear errors that name the
path (CLI: exit 2, one `error:` line, no traceback), nothing half-prepared, nothing left behind.

Every data-source case prepares into a temporary TFDS data dir, never ~/tensorflow_datasets.
"""

import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error

from camu_jax.data import builders
from camu_jax.data.builders import DataSourceError
from camu_jax.data.loading import load_dataset

ROOT = Path(__file__).resolve().parents[1]
DAMAGED = "train-images-idx3-ubyte.gz"  # Read first, so its damage is what gets reported.


def run_main(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.unlearn", "--no-progress", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )


# -- damaged IDX .gz files ----------------------------------------------------------------------


def _gz_bytes(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
        f.write(payload)
    return buf.getvalue()


def _damage(blob: bytes, how: str) -> bytes:
    blob = bytearray(blob)
    if how == "truncated":
        return bytes(blob[: len(blob) // 2])
    if how == "crc":
        blob[-8] ^= 0xFF  # The trailer is CRC32 then ISIZE, 4 bytes each.
    elif how == "deflate":
        blob[12] ^= 0xFF  # The deflate block header, right after gzip's 10-byte header.
    elif how == "random":
        return np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return bytes(blob)


def _idx_manual_dir(directory: Path, damage: str) -> Path:
    """Four small valid IDX .gz files, the training images then damaged as `damage` says."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    for name in builders._IDX_FILES.values():
        images = "images" in name
        array = rng.integers(0, 256 if images else 10, (3, 28, 28) if images else 3, np.uint8)
        header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
        blob = _gz_bytes(header + array.tobytes())
        (directory / name).write_bytes(_damage(blob, damage) if name == DAMAGED else blob)
    return directory


# What gzip/zlib/tarfile say about each damage, so each test shows which failure it reached.
SAYS = {
    "truncated": "truncated (Compressed file ended",
    "crc": "CRC check failed",
    "deflate": "while decompressing data",
    "random": "Not a gzipped file",
}


@pytest.mark.parametrize("damage", SAYS)
def test_damaged_idx_gz_names_the_file_and_prepares_nothing(tmp_path, damage):
    manual = _idx_manual_dir(tmp_path / "manual", damage)
    data_dir = tmp_path / "tfds"
    with pytest.raises(DataSourceError) as err:
        load_dataset("mnist", data_dir=str(data_dir), manual_dir=str(manual), progress=False)
    message = str(err.value)
    assert message.startswith(f"{manual / DAMAGED}: ") and "\n" not in message
    assert SAYS[damage] in message
    # TFDS prepares into a temporary folder and renames it only on success.
    assert not (data_dir / "camu_mnist").exists() or not any((data_dir / "camu_mnist").iterdir())


# -- CIFAR archives ----------------------------------------------------------------------------


def _tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    # Compressed apart, so the gzip header has no file name and `_damage` finds the deflate
    # stream at byte 10 as in the IDX files.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_gz_bytes(buf.getvalue()))
    return path


def _cifar100_members(n=20) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    members = {
        f"cifar-100-python/{split}": pickle.dumps(
            {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": [7] * n}
        )
        for split in ("train", "test")
    }
    members["cifar-100-python/meta"] = pickle.dumps(
        {"fine_label_names": [f"c{i}" for i in range(100)]}
    )
    return members


class _WritesMarker:
    """A pickle that, if ever loaded by a plain unpickler, creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "code ran")


def test_malicious_cifar_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "code_ran"
    member = "cifar-100-python/train"
    members = {**_cifar100_members(), member: pickle.dumps(_WritesMarker(marker))}
    archive = _tar_gz(tmp_path / "manual" / "cifar-100-python.tar.gz", members)
    with pytest.raises(DataSourceError, match=r"refusing to load pathlib\.Path\.write_text") as e:
        load_dataset("cifar100", data_dir=str(tmp_path / "tfds"), manual_dir=str(archive.parent))
    assert str(e.value).startswith(f"{archive} (member {member}): ")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("replace", "needle"),
    [
        ({"cifar-100-python/test": pickle.dumps({"fine_labels": [1]})}, "lacks the key 'data'"),
        ({"cifar-100-python/test": pickle.dumps([1, 2])}, "holds a list"),
        ({"cifar-100-python/meta": b"\x80\x04garbage"}, "not a CIFAR python batch"),
    ],
)
def test_malformed_cifar_batch_names_the_member(tmp_path, replace, needle):
    archive = _tar_gz(tmp_path / "cifar-100-python.tar.gz", {**_cifar100_members(), **replace})
    with pytest.raises(DataSourceError, match=needle) as err:
        load_dataset("cifar100", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path))
    (member,) = replace
    assert str(err.value).startswith(f"{archive} (member {member}): ")


@pytest.mark.parametrize("damage", SAYS)
def test_damaged_cifar_archive_names_it_and_a_later_good_one_prepares(tmp_path, damage):
    good = _tar_gz(tmp_path / "good.tar.gz", _cifar100_members()).read_bytes()
    manual = tmp_path / "manual"
    manual.mkdir()
    archive = manual / "cifar-100-python.tar.gz"
    archive.write_bytes(_damage(good, damage))
    data_dir = tmp_path / "tfds"
    with pytest.raises(DataSourceError) as err:
        load_dataset("cifar100", data_dir=str(data_dir), manual_dir=str(manual), progress=False)
    assert str(err.value).startswith(f"{archive}: cannot be read")
    # tarfile tries every compression before saying it is not an archive.
    assert (SAYS[damage] if damage != "random" else "could not be opened") in str(err.value)
    # The failed attempt left nothing that looks prepared, so the fixed archive is used.
    archive.write_bytes(good)
    ds = load_dataset("cifar100", data_dir=str(data_dir), manual_dir=str(manual), progress=False)
    assert ds.num_train == ds.num_test == 20


# -- the CLI: exit 2, one line naming the path --------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "crc", "random"])
def test_cli_damaged_idx_gz(tmp_path, damage):
    manual = _idx_manual_dir(tmp_path / "manual", damage)
    proc = run_main(
        "--dataset", "mnist", "--manual-dir", str(manual), "--data-dir", str(tmp_path / "tfds"),
        "--workdir", str(tmp_path / "wd"), "--original-epochs", "1", "--no-relearn",
    )  # fmt: skip
    assert_one_line_error(proc, manual / DAMAGED)
    assert not (tmp_path / "wd").exists()


def test_cli_malicious_cifar10_archive(tmp_path):
    marker = tmp_path / "code_ran"
    evil = pickle.dumps(_WritesMarker(marker))
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    archive = _tar_gz(
        tmp_path / "manual" / "cifar-10-python.tar.gz",
        {f"cifar-10-batches-py/{n}": evil for n in names},
    )
    proc = run_main(
        "--dataset", "cifar10", "--manual-dir", str(archive.parent),
        "--data-dir", str(tmp_path / "tfds"), "--workdir", str(tmp_path / "wd"),
    )  # fmt: skip
    assert_one_line_error(proc, archive, "refusing to load")
    assert not marker.exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write into: a read-only tmpfs mount, or mode 0555 for non-root.

    Root ignores permission bits, so for root only a read-only mount is a real test.
    """
    directory = tmp_path / "ro"
    directory.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(directory)],
            capture_output=True,
            text=True,
        )
        why = proc.stderr.strip()
    except FileNotFoundError:
        proc, why = None, "no mount command"
    if proc is not None and proc.returncode == 0:
        yield directory
        subprocess.run(["umount", str(directory)], check=True)
    elif os.geteuid() != 0:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
    else:
        pytest.skip(f"root without a read-only mount ({why}); permission bits do not stop root")


def _assert_workdir_refused(tmp_path, workdir, needle):
    before = sorted(os.listdir(tmp_path))
    proc = run_main("--workdir", str(workdir), "--original-epochs", "1", "--no-relearn")
    assert_one_line_error(proc, workdir, needle)
    assert sorted(os.listdir(tmp_path)) == before  # Nothing made, the write probe gone again.


@pytest.mark.parametrize(
    ("subpath", "needle"),
    [("file", "is an existing file"), ("file/wd", "lies under the file")],
)
def test_cli_workdir_that_is_or_lies_under_a_file(tmp_path, subpath, needle):
    (tmp_path / "file").write_text("keep")
    _assert_workdir_refused(tmp_path, tmp_path / subpath, needle)
    assert (tmp_path / "file").read_text() == "keep"


def test_cli_checkpoint_dir_that_is_a_file(tmp_path):
    (tmp_path / "ckpt").write_text("keep")
    proc = run_main("--workdir", str(tmp_path / "wd"), "--checkpoint-dir", str(tmp_path / "ckpt"))
    assert_one_line_error(proc, f"--checkpoint-dir {tmp_path / 'ckpt'} is an existing file")
    assert not (tmp_path / "wd").exists()


def test_cli_workdir_on_read_only_file_system(tmp_path, read_only_dir):
    _assert_workdir_refused(tmp_path, read_only_dir / "wd", f"not writable ({read_only_dir}: ")


def test_cli_forget_indices_directory(tmp_path):
    (tmp_path / "indices").mkdir()
    proc = run_main(
        "--workdir", str(tmp_path / "wd"), "--scenario", "indices",
        "--forget-indices", str(tmp_path / "indices"),
    )  # fmt: skip
    assert_one_line_error(proc, tmp_path / "indices", "is a directory")
    assert not (tmp_path / "wd").exists()


# -- stale temp files of the atomic writer ------------------------------------------------------


def test_next_run_removes_stale_temp_files(tmp_path):
    workdir = tmp_path / "wd"
    (workdir / "splits").mkdir(parents=True)
    stale = [workdir / ".results.json.k3j4h5g6.tmp", workdir / "splits" / ".x.npz.ab_12cd3.tmp"]
    for path in stale:
        path.write_text("half a file")
    (workdir / "notes.tmp").write_text("mine")  # Not the writer's pattern: stays.
    proc = run_main("--workdir", str(workdir), "--original-epochs", "1", "--no-relearn")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any(path.exists() for path in stale)
    assert (workdir / "notes.tmp").read_text() == "mine"
    assert json.loads((workdir / "results.json").read_text())["runs"]
    assert not [p.name for p in workdir.rglob("*.tmp") if p.name != "notes.tmp"]
