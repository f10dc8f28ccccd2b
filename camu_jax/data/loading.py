"""Load a prepared TFDS dataset into in-memory numpy arrays, in source order.

The datasets here are small enough (<= 60k images of <= 3 KiB) to live in memory, and training
loops index them by position every step, so each split is decoded once per process and cached.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import decode
from tensorflow_datasets.core.utils import tqdm_utils
from tensorflow_datasets.proto import tf_example_pb2

from camu_jax.data import catalog
from camu_jax.data.builders import BUILDERS, DataSourceError

SUPPORTED_DATASETS: tuple[str, ...] = catalog.NAMES
DATA_DIR_ENV = "CAMU_DATA_DIR"
# Records decoded per `__getitems__` call: bounds the transient list of raw records.
_READ_CHUNK = 8192


# eq=False: dataclass equality would compare arrays elementwise and raise on `==`.
@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset's two splits as arrays, in source order (row i has TFDS `index` i).

    The arrays are read-only because `load_dataset` hands the same cached object to every
    caller; copy before modifying.
    """

    name: str
    num_classes: int
    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int32 [N]
    test_images: np.ndarray  # uint8 [M, H, W, C]
    test_labels: np.ndarray  # int32 [M]
    class_names: tuple[str, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_test(self) -> int:
        return len(self.test_labels)

    @functools.cached_property
    def train_fingerprint(self) -> str:
        """sha256 of the training split's content (shapes, dtypes, images and labels): what a
        trained model depends on. Computed once (the arrays are read-only)."""
        h = hashlib.sha256()
        for a in (self.train_images, self.train_labels):
            h.update(f"{a.dtype}{a.shape};".encode())
            h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
        return h.hexdigest()


def default_data_dir() -> str:
    """`$CAMU_DATA_DIR` if set, else TFDS's usual `~/tensorflow_datasets`."""
    return os.environ.get(DATA_DIR_ENV) or str(Path("~/tensorflow_datasets").expanduser())


def _check_name(name: str) -> str:
    if name not in SUPPORTED_DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}; supported datasets are {', '.join(SUPPORTED_DATASETS)}."
        )
    return name


def _normalize_dir(path: str | os.PathLike | None) -> str | None:
    # Normalised so equivalent spellings share one cache entry.
    return None if path is None else os.path.abspath(os.path.expanduser(os.fspath(path)))


@contextlib.contextmanager
def _progress_bars(enable: bool) -> Iterator[None]:
    # TFDS only exposes a global switch; remember the previous state (a private flag, read
    # defensively) so a caller's own `tfds.disable_progress_bar()` is neither overridden by
    # `progress=True` nor lost after `progress=False`.
    previous = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(enable and previous)
    try:
        yield
    finally:
        tfds.display_progress_bar(previous)


def prepare(
    name: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    progress: bool = True,
) -> tfds.core.DatasetBuilder:
    """Builds the dataset's files under `data_dir` unless already there; returns the builder.

    Nothing is downloaded: a dataset with source files (`REQUIRED_FILES`) that is not prepared
    yet needs `manual_dir`, else FileNotFoundError says which files to put there. A prepared
    dataset whose files are damaged is refused (`DataSourceError`) naming the folder to delete.
    """
    cls = BUILDERS[_check_name(name)]
    builder = _builder(cls, _normalize_dir(data_dir) or default_data_dir())
    manual = _normalize_dir(manual_dir)
    # Offline is the normal case (clusters): TFDS would retry a download for minutes and leave
    # a temporary folder behind, so the rule is checked before any TFDS code runs.
    if manual is None and cls.REQUIRED_FILES and not builder.data_path.exists():
        raise FileNotFoundError(
            f"{name} is not prepared in {builder.data_path.parent.parent} and camu_jax does not "
            f"download: {cls.MANUAL_DOWNLOAD_INSTRUCTIONS.removesuffix('.')} and pass that "
            "directory as manual_dir (--manual-dir)"
        )
    # TFDS treats a missing or empty manual dir as "download instead", which is right for its
    # default `<data_dir>/downloads/manual` but hides a typo in a directory the caller named.
    # (The version folder only appears once preparation completed, so it means "prepared".)
    if manual is not None and cls.REQUIRED_FILES and not builder.data_path.exists():
        if not os.path.isdir(manual) or not os.listdir(manual):
            raise FileNotFoundError(
                f"{builder.name}: manual directory {manual} is missing or empty; expected "
                f"{', '.join(cls.REQUIRED_FILES.values())} there.\n"
                f"{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
    # A no-op when the version folder exists; `is_prepared()` would also work but logs a
    # warning for every dataset not prepared yet.
    config = tfds.download.DownloadConfig(manual_dir=manual)
    with _progress_bars(progress):
        builder.download_and_prepare(download_config=config, file_format="array_record")
    return builder


def _builder(cls, data_dir: str) -> tfds.core.DatasetBuilder:
    """`cls` on `data_dir`; a prepared folder whose metadata cannot be read (a truncated
    dataset_info.json) is refused naming the folder."""
    try:
        return cls(data_dir=data_dir)
    except Exception as e:
        folder = Path(data_dir) / cls.name / str(cls.VERSION)
        if not folder.exists():
            raise
        raise _damaged(folder, e) from e


def _damaged(folder: str | os.PathLike, error: Exception) -> DataSourceError:
    return DataSourceError(
        folder,
        f"the prepared dataset is damaged ({type(error).__name__}: {error}); delete this "
        "folder and run again to prepare it anew from the source files",
    )


def _decode_records(records: list[bytes], image_shape: tuple[int, ...]):
    """Parses our own tf.Example records directly.

    TFDS's generic `deserialize_example_np` costs ~90 us per record in Python (5 s for MNIST's
    train split); parsing the proto and joining the image bytes is ~4x faster. Its other
    non-decoding mode (DESERIALIZE_NO_DECODE) imports TensorFlow, so it is not an option.
    """
    images, labels, index = [], np.empty(len(records), np.int64), np.empty(len(records), np.int64)
    for i, record in enumerate(records):
        feature = tf_example_pb2.Example.FromString(record).features.feature
        image = feature["image"]
        if image.bytes_list.value:
            images.append(image.bytes_list.value[0])
        else:  # Written with the default Tensor encoding: one int64 per pixel.
            images.append(np.asarray(image.int64_list.value, np.uint8).tobytes())
        labels[i] = feature["label"].int64_list.value[0]
        index[i] = feature["index"].int64_list.value[0]
    flat = np.frombuffer(b"".join(images), dtype=np.uint8)
    return flat.reshape(len(records), *image_shape), labels, index


def _read_split(builder: tfds.core.DatasetBuilder, split: str):
    source = builder.as_data_source(
        split=split, deserialize_method=decode.DeserializeMethod.RAW_BYTES
    )
    n = len(source)
    expected = builder.info.splits[split].num_examples
    if n != expected:
        raise ValueError(f"{builder.name}/{split}: {n} records on disk, info says {expected}")
    shape = tuple(builder.info.features["image"].shape)
    parts = [
        _decode_records(source.__getitems__(list(range(lo, min(lo + _READ_CHUNK, n)))), shape)
        for lo in range(0, n, _READ_CHUNK)
    ]
    images = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, *shape), np.uint8)
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    index = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
    # Unlearning splits are chosen by position, so a reordered read would silently change
    # which examples get forgotten.
    if not np.array_equal(index, np.arange(n)):
        first = int(np.flatnonzero(index != np.arange(n))[0])
        raise ValueError(
            f"{builder.name}/{split} is not in source order: record {first} has index "
            f"{index[first]} (was it prepared with shuffling?)"
        )
    return images, labels


# `progress` only changes what is displayed, so it travels beside the cache key rather than in it.
_show_progress: contextvars.ContextVar[bool] = contextvars.ContextVar("progress", default=True)


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, data_dir: str, manual_dir: str | None) -> Dataset:
    builder = prepare(name, data_dir=data_dir, manual_dir=manual_dir, progress=_show_progress.get())
    cls = BUILDERS[name]
    arrays = {}
    for split in ("train", "test"):
        # Riegeli and protobuf report a damaged file without saying which dataset it is in.
        try:
            images, labels = _read_split(builder, split)
        except Exception as e:
            raise _damaged(builder.data_path, e) from e
        if labels.size and (labels.min() < 0 or labels.max() >= cls.NUM_CLASSES):
            raise ValueError(f"{name}/{split}: labels outside [0, {cls.NUM_CLASSES})")
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.astype(np.int32)
    for array in arrays.values():
        array.setflags(write=False)  # Shared through the cache.
    names = builder.info.metadata.get("class_names") if builder.info.metadata else None
    return Dataset(
        name=name,
        num_classes=cls.NUM_CLASSES,
        class_names=tuple(names or cls.CLASS_NAMES),
        **arrays,
    )


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    progress: bool = True,
) -> Dataset:
    """Returns `name`'s train and test splits as arrays, preparing the TFDS files if needed.

    Args:
      name: one of `SUPPORTED_DATASETS`.
      data_dir: TFDS data directory; default `$CAMU_DATA_DIR` or `~/tensorflow_datasets`.
      manual_dir: directory holding the source files (see each builder's
        `MANUAL_DOWNLOAD_INSTRUCTIONS`); nothing is downloaded, so a dataset not yet prepared
        needs it (FileNotFoundError otherwise, before anything is written). Only used when
        the dataset is not yet prepared. `digits` needs nothing (scikit-learn ships it).
      progress: show TFDS progress bars while preparing (`False` hides them; `True` keeps
        TFDS's global setting, e.g. `tfds.disable_progress_bar()`).

    Results are cached per process: a repeated call with the same arguments returns the same
    (read-only) `Dataset` without touching disk.
    """
    _check_name(name)
    token = _show_progress.set(progress)
    try:
        return _load_cached(
            name, _normalize_dir(data_dir) or default_data_dir(), _normalize_dir(manual_dir)
        )
    finally:
        _show_progress.reset(token)


def clear_cache() -> None:
    """Drops the in-memory datasets (e.g. after deleting or re-preparing files on disk)."""
    _load_cached.cache_clear()
