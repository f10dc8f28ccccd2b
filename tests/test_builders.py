"""TFDS builders and `load_dataset`: real MNIST/Fashion-MNIST, CIFAR via generated archives."""

import gzip
import io
import pickle
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camu_jax.data import builders, loading
from camu_jax.data.builders import fingerprint, read_idx
from camu_jax.data.loading import SUPPORTED_DATASETS, Dataset, load_dataset

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
ARRAY_ROWS = {"train images": "train_images", "train labels": "train_labels",
              "test images": "test_images", "test labels": "test_labels"}  # fmt: skip


def _readme_fingerprints(readme: Path) -> dict[str, dict[str, str]]:
    """The content-fingerprint table of the shared README: {dataset: {array: hex16}}."""
    table = {"mnist": {}, "fashion_mnist": {}}
    for line in readme.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in ARRAY_ROWS and re.fullmatch(r"[0-9a-f]{16}", cells[1]):
            table["mnist"][ARRAY_ROWS[cells[0]]] = cells[1]
            table["fashion_mnist"][ARRAY_ROWS[cells[0]]] = cells[2]
    assert all(len(v) == 4 for v in table.values()), f"fingerprint table not found in {readme}"
    return table


def _assert_source_order(name: str, data_dir: Path, ds: Dataset, positions=(0, 1, -1)):
    """TFDS's own decoder (not loading's fast path) agrees with `ds` at a few positions."""
    builder = builders.BUILDERS[name](data_dir=str(data_dir))
    assert builder.info.disable_shuffling
    assert builder.info.file_format.value == "array_record"
    for split in ("train", "test"):
        source = builder.as_data_source(split=split)
        images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
        for pos in positions:
            pos %= len(source)
            example = source[pos]
            assert example["index"] == pos
            assert example["label"] == labels[pos]
            np.testing.assert_array_equal(example["image"], images[pos])


def _check_arrays(ds: Dataset, n_train: int, n_test: int, shape: tuple, num_classes: int):
    assert ds.train_images.shape == (n_train, *shape) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (n_test, *shape) and ds.test_images.dtype == np.uint8
    assert ds.train_labels.shape == (n_train,) and ds.train_labels.dtype == np.int32
    assert ds.test_labels.shape == (n_test,) and ds.test_labels.dtype == np.int32
    assert ds.image_shape == shape and ds.num_classes == num_classes
    assert len(ds.class_names) == num_classes


# -- digits: offline, from scikit-learn ----------------------------------------------------------


def test_digits_offline_shapes_and_order(tmp_path):
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", data_dir=str(tmp_path), progress=False)
    _check_arrays(ds, 1437, 360, (8, 8, 1), 10)
    assert set(np.unique(ds.train_labels)) == set(range(10)) == set(np.unique(ds.test_labels))
    ref = load_digits()
    pixels = np.clip(np.round(ref.data * 255 / 16), 0, 255).astype(np.uint8).reshape(-1, 8, 8, 1)
    np.testing.assert_array_equal(np.concatenate([ds.train_images, ds.test_images]), pixels)
    np.testing.assert_array_equal(np.concatenate([ds.train_labels, ds.test_labels]), ref.target)
    _assert_source_order("digits", tmp_path, ds, positions=range(0, 1437, 97))


def test_digits_cached_deterministic_and_read_only(tmp_path):
    first = load_dataset("digits", data_dir=str(tmp_path / "a"), progress=False)
    assert load_dataset("digits", data_dir=str(tmp_path / "a")) is first  # Cache hit.
    with pytest.raises(ValueError):
        first.train_images[0, 0, 0, 0] = 1  # Shared through the cache, so frozen.
    loading.clear_cache()
    again = load_dataset("digits", data_dir=str(tmp_path / "a"), progress=False)  # From disk.
    fresh = load_dataset("digits", data_dir=str(tmp_path / "b"), progress=False)  # Re-prepared.
    for other in (again, fresh):
        assert other is not first
        for field in ("train_images", "train_labels", "test_images", "test_labels"):
            np.testing.assert_array_equal(getattr(other, field), getattr(first, field))


# -- real MNIST / Fashion-MNIST from ../shared/data ---------------------------------------------


@pytest.fixture(scope="module")
def idx_data_dir(tmp_path_factory):
    # One data dir for the module: preparing 70k images is the slow part of this file.
    return tmp_path_factory.mktemp("tfds_idx")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_idx_dataset_matches_readme_fingerprints(name, shared_data, idx_data_dir):
    expected = _readme_fingerprints(shared_data / "README.md")[name]
    ds = load_dataset(
        name, data_dir=str(idx_data_dir), manual_dir=str(shared_data / name), progress=False
    )
    _check_arrays(ds, 60000, 10000, (28, 28, 1), 10)
    got = {
        "train_images": fingerprint(ds.train_images[..., 0]),
        "train_labels": fingerprint(ds.train_labels.astype(np.uint8)),
        "test_images": fingerprint(ds.test_images[..., 0]),
        "test_labels": fingerprint(ds.test_labels.astype(np.uint8)),
    }
    assert got == expected
    _assert_source_order(name, idx_data_dir, ds, positions=(0, 1, 12345, -1))


# -- CIFAR-10 from the lossy JPEG zip, repacked in the official python-pickle format --------------


def _tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def _rows(images: np.ndarray) -> np.ndarray:
    """NHWC -> the official [N, 3072] channel-major rows."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


@pytest.fixture(scope="module")
def cifar10_subset(shared_data):
    """(train_images, train_labels, test_images, test_labels) decoded from the JPEG zip.

    A subset keeps the test fast: 100 train / 20 test images per class, classes interleaved
    round-robin (the zip lost the original interleaving; any fixed order will do).
    """
    out = []
    with zipfile.ZipFile(shared_data / "cifar10_jpeg.zip") as archive:
        for split, per_class in (("train", 100), ("test", 20)):
            images, labels = [], []
            for i in range(per_class):
                for label, cls in enumerate(CIFAR10_CLASSES):
                    with archive.open(f"{split}/{cls}/{i:04d}.jpg") as f:
                        images.append(np.asarray(Image.open(f).convert("RGB")))
                    labels.append(label)
            out += [np.stack(images), np.asarray(labels)]
    return tuple(out)


def test_cifar10_from_python_pickle_archive(cifar10_subset, tmp_path):
    train_x, train_y, test_x, test_y = cifar10_subset
    members = {}
    # Five batches of unequal size: the builder must not assume 10000 per batch.
    cuts = np.split(np.arange(len(train_y)), [150, 400, 600, 850])
    for b, idx in enumerate(cuts, start=1):
        batch = {b"batch_label": b"training batch", b"labels": train_y[idx].tolist(),
                 b"data": _rows(train_x[idx]), b"filenames": [b"x.png"] * len(idx)}  # fmt: skip
        members[f"cifar-10-batches-py/data_batch_{b}"] = pickle.dumps(batch, protocol=2)
    members["cifar-10-batches-py/test_batch"] = pickle.dumps(
        {b"labels": test_y.tolist(), b"data": _rows(test_x)}, protocol=2
    )
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps(
        {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}, protocol=2
    )
    manual = tmp_path / "manual"
    manual.mkdir()
    _tar_gz(manual / "cifar-10-python.tar.gz", members)

    data_dir = tmp_path / "tfds"
    ds = load_dataset("cifar10", data_dir=str(data_dir), manual_dir=str(manual), progress=False)
    _check_arrays(ds, 1000, 200, (32, 32, 3), 10)
    np.testing.assert_array_equal(ds.train_images, train_x)
    np.testing.assert_array_equal(ds.train_labels, train_y)
    np.testing.assert_array_equal(ds.test_images, test_x)
    np.testing.assert_array_equal(ds.test_labels, test_y)
    assert ds.class_names == CIFAR10_CLASSES
    _assert_source_order("cifar10", data_dir, ds, positions=(0, 149, 150, 999))


# -- CIFAR-100 from generated arrays -------------------------------------------------------------


def _cifar100_members(rng, n_train=300, n_test=100):
    arrays, members = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fine = rng.permutation(np.arange(n) % 100)  # Every fine label occurs.
        arrays[split] = (images, fine)
        # str keys, as a Python-3 pickle would have: the builder accepts both kinds.
        members[f"cifar-100-python/{split}"] = pickle.dumps(
            {
                "data": _rows(images),
                "fine_labels": fine.tolist(),
                "coarse_labels": (fine // 5).tolist(),
            }
        )
    names = [f"class_{i:02d}" for i in range(100)]
    members["cifar-100-python/meta"] = pickle.dumps({"fine_label_names": names})
    return arrays, members, tuple(names)


@pytest.mark.parametrize("layout", ["archive", "extracted"])
def test_cifar100_generated(layout, tmp_path):
    arrays, members, names = _cifar100_members(np.random.default_rng(0))
    manual = tmp_path / "manual"
    manual.mkdir()
    if layout == "archive":
        _tar_gz(manual / "cifar-100-python.tar.gz", members)
    else:
        for name, blob in members.items():
            (manual / name).parent.mkdir(exist_ok=True)
            (manual / name).write_bytes(blob)
    data_dir = tmp_path / "tfds"
    ds = load_dataset("cifar100", data_dir=str(data_dir), manual_dir=str(manual), progress=False)
    _check_arrays(ds, 300, 100, (32, 32, 3), 100)
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(ds, f"{split}_images"), arrays[split][0])
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), arrays[split][1])
    assert ds.class_names == names
    _assert_source_order("cifar100", data_dir, ds)


def test_cifar_pickles_cannot_run_code(tmp_path):
    evil = {"cifar-100-python/train": pickle.dumps(print)}  # Any global but numpy's.
    arrays, members, _ = _cifar100_members(np.random.default_rng(1), 100, 100)
    _tar_gz(tmp_path / "cifar-100-python.tar.gz", {**members, **evil})
    with pytest.raises(builders.DataSourceError, match="refusing to load builtins.print") as e:
        load_dataset("cifar100", data_dir=str(tmp_path / "d"), manual_dir=str(tmp_path))
    assert isinstance(e.value.__cause__, pickle.UnpicklingError)


# -- errors ----------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)


def test_manual_dir_missing_file_is_named(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz"):  # fmt: skip
        _write_idx(manual / name, np.zeros(3, np.uint8))
    with pytest.raises(FileNotFoundError, match=r"is missing t10k-labels-idx1-ubyte\.gz\.") as err:
        load_dataset("mnist", data_dir=str(tmp_path / "d"), manual_dir=str(manual))
    assert str(manual) in str(err.value)

    # A named manual dir that is absent (here: for CIFAR-10) fails instead of downloading.
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=str(tmp_path / "d"), manual_dir=str(tmp_path / "no"))
    # ...and so does one holding something else.
    with pytest.raises(FileNotFoundError, match="missing cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=str(tmp_path / "d"), manual_dir=str(manual))


def test_wrong_idx_content_is_rejected(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in builders._IDX_FILES.values():
        _write_idx(manual / name, np.zeros((2, 28, 28) if "images" in name else 2, np.uint8))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*fingerprint"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path / "d"), manual_dir=str(manual))
    assert not (tmp_path / "d" / "camu_fashion_mnist" / "1.0.0").exists()  # Nothing half-made.


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="'svhn'") as err:
        load_dataset("svhn")
    for name in SUPPORTED_DATASETS:
        assert name in str(err.value)
    assert set(SUPPORTED_DATASETS) == set(builders.BUILDERS)
