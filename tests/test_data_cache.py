"""The prepared TFDS cache and its sources: a damaged prepared dataset is refused naming the
folder to delete; a dataset not prepared and without a manual dir fails at once, offline, saying
which files to put where (nothing is downloaded, nothing is left behind)."""

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error

from camu_jax.data import loading
from camu_jax.data.builders import DataSourceError
from camu_jax.data.loading import load_dataset

ROOT = Path(__file__).resolve().parents[1]

# Runs `experiments.unlearn.main(argv)` in a process that cannot open a network connection.
OFFLINE = """
import socket, sys
def offline(*args, **kwargs):
    raise AssertionError("tried to reach the network")
socket.socket.connect = socket.socket.connect_ex = offline
socket.create_connection = socket.getaddrinfo = offline
from experiments.unlearn import main
sys.exit(main(sys.argv[1:]))
"""


def run_main(*args, offline=False):
    command = ["-c", OFFLINE] if offline else ["-m", "experiments.unlearn"]
    return subprocess.run(
        [sys.executable, *command, "--no-progress", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )


@pytest.fixture
def offline(monkeypatch):
    """No network connection can be opened: a test that tries fails at once."""

    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def digits_dir(tmp_path):
    """Digits prepared into a fresh data dir; returns (data_dir, its version folder)."""
    data_dir = tmp_path / "tfds"
    load_dataset("digits", data_dir=str(data_dir), progress=False)
    loading.clear_cache()
    yield data_dir, data_dir / "camu_digits" / "1.0.0"
    loading.clear_cache()


def _flip_byte(path: Path, where: float) -> None:
    blob = bytearray(path.read_bytes())
    blob[int(len(blob) * where)] ^= 0xFF
    path.write_bytes(bytes(blob))


# -- a damaged prepared dataset -----------------------------------------------------------------


# Within the records: the end of a shard is padding (a flip there changes nothing read).
@pytest.mark.parametrize("where", [0.1, 0.4, 0.7])
def test_a_flipped_byte_in_an_array_record_names_the_folder(digits_dir, where):
    data_dir, folder = digits_dir
    (shard,) = folder.glob("camu_digits-train.array_record-*")
    _flip_byte(shard, where)
    with pytest.raises(DataSourceError, match="delete this folder") as err:
        load_dataset("digits", data_dir=str(data_dir), progress=False)
    assert str(err.value).startswith(f"{folder}: the prepared dataset is damaged")
    assert "\n" not in str(err.value)
    # Doing as told works: the folder is prepared again.
    shutil.rmtree(folder)
    assert load_dataset("digits", data_dir=str(data_dir), progress=False).num_train == 1437


def test_a_truncated_dataset_info_names_the_folder(digits_dir):
    data_dir, folder = digits_dir
    info = folder / "dataset_info.json"
    info.write_bytes(info.read_bytes()[: info.stat().st_size // 2])
    with pytest.raises(DataSourceError, match="delete this folder") as err:
        load_dataset("digits", data_dir=str(data_dir), progress=False)
    assert str(err.value).startswith(f"{folder}: the prepared dataset is damaged")


def test_cli_damaged_cache(digits_dir, tmp_path):
    data_dir, folder = digits_dir
    (shard,) = folder.glob("camu_digits-test.array_record-*")
    _flip_byte(shard, 0.5)
    proc = run_main("--data-dir", data_dir, "--workdir", tmp_path / "wd")
    assert_one_line_error(proc, folder, "delete this folder")
    assert not (tmp_path / "wd").exists()


# -- not prepared, no manual dir: nothing is downloaded -----------------------------------------


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("cifar100", "cifar-100-python.tar.gz"),
        ("cifar10", "cifar-10-python.tar.gz"),
        ("mnist", "train-images-idx3-ubyte.gz"),
    ],
)
def test_no_manual_dir_fails_fast_offline(tmp_path, offline, name, needle):
    data_dir = tmp_path / "tfds"
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="manual_dir") as err:
        load_dataset(name, data_dir=str(data_dir), progress=False)
    assert time.monotonic() - start < 10
    assert needle in str(err.value) and str(data_dir) in str(err.value)
    assert "\n" not in str(err.value)
    assert not data_dir.exists() or not any(data_dir.rglob("*"))  # No .tmp folder left.


def test_cli_cifar100_offline_without_manual_dir(tmp_path):
    data_dir = tmp_path / "tfds"
    proc = run_main(
        "--dataset", "cifar100", "--data-dir", data_dir, "--workdir", tmp_path / "wd",
        offline=True,
    )  # fmt: skip
    assert_one_line_error(proc, "cifar-100-python.tar.gz", "--manual-dir", data_dir)
    assert "tried to reach the network" not in proc.stderr
    assert not data_dir.exists() or not any(data_dir.rglob("*"))
    assert not (tmp_path / "wd").exists()
