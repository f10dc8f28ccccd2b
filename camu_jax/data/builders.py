"""TFDS builders for the datasets camu-jax trains on.

Every builder writes `image` (uint8 HxWxC), `label` (int64) and `index` (int64, position in the
source order) as plain `tfds.features.Tensor`s into ArrayRecord files with shuffling disabled, so
a split read back by position is exactly the upstream order. Unlearning experiments pick forget
sets by index, so that order is part of the contract.

The classes are deliberately *not* registered with TFDS (`skip_registration=True`): TFDS raises
`ValueError` when a name is registered twice, which would break a second import of this module
(reloads, two import paths). `camu_jax.data.loading` instantiates them directly instead.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import pickle
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from camu_jax.data import catalog

_VERSION = tfds.core.Version("1.0.0")
_MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# The most an IDX file of MNIST or Fashion-MNIST may hold; checked against its header first.
_IDX_MAX_SHAPES = {
    "train_images": (60000, 28, 28),
    "train_labels": (60000,),
    "test_images": (10000, 28, 28),
    "test_labels": (10000,),
}


class DataSourceError(ValueError):
    """A source file (IDX file, CIFAR archive or batch) that cannot be read or decoded.

    The message is one line starting with the file, so a CLI can print it as it is.
    """

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = " ".join(problem.split())  # One line, whatever the cause said.
        super().__init__(f"{self.path}: {self.problem}")


def _read_error(path: str | Path, error: Exception) -> DataSourceError:
    """Wraps an error from reading or decompressing `path`; a truncated stream says so."""
    reason = str(error) or type(error).__name__
    if isinstance(error, EOFError):
        reason = f"truncated ({reason})"
    return DataSourceError(
        path, f"cannot be read: {reason}; the file is damaged or not the upstream one"
    )


def fingerprint(array: np.ndarray) -> str:
    """First 16 hex digits of sha256 over the array's C-order bytes (the shared data README's)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def read_idx(path: str | Path, *, max_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Decodes a (possibly gzipped) IDX file: byte 3 = ndim, big-endian uint32 dims, uint8 data.

    `max_shape` (items, *item dims): the header must give this many dimensions, these item
    dims and at most this many items, or the file is refused before its data is decompressed:
    a 2 MB gzip bomb whose header claims billions of bytes never gets them allocated. Only the
    bytes the header accounts for are decompressed (one more shows the file is longer).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
                raise DataSourceError(path, f"not an unsigned-byte IDX file (magic {head!r})")
            ndim = head[3]
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataSourceError(path, f"IDX header for {ndim} dimensions is cut short")
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
            if max_shape is not None and (
                len(dims) != len(max_shape)
                or dims[1:] != tuple(max_shape[1:])
                or dims[0] > max_shape[0]
            ):
                raise DataSourceError(
                    path,
                    f"IDX header says shape {dims}; this file holds at most {tuple(max_shape)} "
                    "(refused before decompressing; the file is damaged or not the upstream one)",
                )
            size = math.prod(dims)
            data = f.read(size)
            longer = len(data) == size and f.read(1) != b""
    except FileNotFoundError:
        raise
    # BadGzipFile (bad magic, CRC or length) is an OSError; a damaged deflate stream raises
    # zlib.error and a truncated one EOFError.
    except (OSError, EOFError, zlib.error) as e:
        raise _read_error(path, e) from e
    if len(data) != size or longer:
        held = "more than that" if longer else f"{len(data)} bytes"
        raise DataSourceError(path, f"header says shape {dims} but holds {held}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


class _CamuBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared feature spec and example writer; subclasses supply the arrays per split."""

    VERSION = _VERSION
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Source order, array_record."}
    IMAGE_SHAPE: ClassVar[tuple[int, int, int]]
    NUM_CLASSES: ClassVar[int]
    CLASS_NAMES: ClassVar[tuple[str, ...]]
    HOMEPAGE: ClassVar[str] = ""
    # Files `_split_generators` needs, by role; empty for datasets that need no download.
    REQUIRED_FILES: ClassVar[Mapping[str, str]] = {}

    def __init__(self, *, file_format: str | None = "array_record", **kwargs: Any):
        # array_record is the only random-access format `as_data_source` can read, and TFDS's
        # default (tfrecord) would need TensorFlow to read back.
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    # Raw bytes: the default encoding widens every pixel to an int64 varint,
                    # which makes writing and reading several times slower.
                    "image": tfds.features.Tensor(
                        shape=self.IMAGE_SHAPE, dtype=np.uint8, encoding="bytes"
                    ),
                    "label": tfds.features.Tensor(shape=(), dtype=np.int64),
                    "index": tfds.features.Tensor(shape=(), dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE or None,
            disable_shuffling=True,
            # Saved to metadata.json beside the data, so readers get the names without the
            # source files (CIFAR replaces them with the names from the archive's meta).
            metadata=tfds.core.MetadataDict(class_names=list(self.CLASS_NAMES)),
        )

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        images = np.ascontiguousarray(images, dtype=np.uint8).reshape(-1, *self.IMAGE_SHAPE)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(images) != len(labels):
            raise ValueError(f"{self.name}: {len(images)} images but {len(labels)} labels")
        bad = (labels < 0) | (labels >= self.NUM_CLASSES)
        if bad.any():
            raise ValueError(f"{self.name}: label {labels[bad][0]} outside [0, {self.NUM_CLASSES})")
        for i in range(len(labels)):
            yield i, {"image": images[i], "label": labels[i], "index": i}

    def _splits(self, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]):
        return {"train": self._generate_examples(*train), "test": self._generate_examples(*test)}

    # -- locating source files -------------------------------------------------------------

    @classmethod
    def _manual_path(cls, dl_manager: tfds.download.DownloadManager) -> Path:
        """The manual dir; FileNotFoundError, saying what to put there, if it is missing or
        empty. Nothing is downloaded: offline is the normal case (clusters), where a download
        retries for minutes (`loading.prepare` checks this before TFDS runs)."""
        try:
            return Path(dl_manager.manual_dir)
        except AssertionError:
            raise FileNotFoundError(
                f"{cls.name}: no manual directory with the source files (nothing is "
                f"downloaded). {cls.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            ) from None

    @classmethod
    def _missing_files_error(cls, manual: Path, missing: list[str]) -> FileNotFoundError:
        return FileNotFoundError(
            f"{cls.name}: manual directory {manual} is missing {', '.join(missing)}. "
            f"Expected there: {', '.join(cls.REQUIRED_FILES.values())}.\n"
            f"{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )


class CamuDigits(_CamuBuilder, skip_registration=True):
    """scikit-learn's bundled 8x8 digits (1797 images, no download), 1437 train / 360 test."""

    IMAGE_SHAPE = (8, 8, 1)
    NUM_CLASSES = catalog.info("digits").num_classes
    CLASS_NAMES = tuple(str(i) for i in range(10))
    NUM_TRAIN = 1437
    HOMEPAGE = "https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Nothing to download: the data ships with scikit-learn."

    def _split_generators(self, dl_manager):
        del dl_manager  # Bundled with scikit-learn.
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are counts 0..16; rescale to the usual uint8 range.
        images = np.clip(np.round(digits.data * 255.0 / 16.0), 0, 255).astype(np.uint8)
        images = images.reshape(-1, *self.IMAGE_SHAPE)
        labels = digits.target.astype(np.int64)
        n = self.NUM_TRAIN
        return self._splits((images[:n], labels[:n]), (images[n:], labels[n:]))


class _IdxBuilder(_CamuBuilder, skip_registration=True):
    """MNIST-style datasets: four gzipped IDX files, verified by decoded-content fingerprint."""

    IMAGE_SHAPE = (28, 28, 1)
    NUM_CLASSES = catalog.info("mnist").num_classes  # and Fashion-MNIST's
    REQUIRED_FILES = _IDX_FILES
    URL: ClassVar[str]
    # Fingerprints of the decoded arrays (images [N,28,28], labels [N]). Content rather than
    # archive checksums because equivalent re-compressed .gz files are in circulation.
    FINGERPRINTS: ClassVar[Mapping[str, str]]

    def _split_generators(self, dl_manager):
        manual = self._manual_path(dl_manager)
        missing = [f for f in _IDX_FILES.values() if not (manual / f).is_file()]
        if missing:
            raise self._missing_files_error(manual, missing)
        paths = {k: manual / f for k, f in _IDX_FILES.items()}
        arrays = {}
        for key, path in paths.items():
            array = read_idx(path, max_shape=_IDX_MAX_SHAPES[key])
            got = fingerprint(array)
            if got != self.FINGERPRINTS[key]:
                raise ValueError(
                    f"{self.name}: {path} decodes to content fingerprint {got}, expected "
                    f"{self.FINGERPRINTS[key]} ({_IDX_FILES[key]} is corrupt or not the upstream "
                    f"file)"
                )
            arrays[key] = array
        return self._splits(
            (arrays["train_images"], arrays["train_labels"]),
            (arrays["test_images"], arrays["test_labels"]),
        )


class CamuMnist(_IdxBuilder, skip_registration=True):
    """MNIST, 60000 train / 10000 test, upstream order."""

    URL = _MNIST_URL
    HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"
    CLASS_NAMES = tuple(str(i) for i in range(10))
    FINGERPRINTS = {
        "train_images": "741c988805d008ac",
        "train_labels": "1feba77c54802fa5",
        "test_images": "6d87418db22cc802",
        "test_labels": "ddeff807876a9661",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put the four MNIST IDX files ({', '.join(_IDX_FILES.values())}) from {_MNIST_URL} "
        "into the manual directory."
    )


class CamuFashionMnist(_IdxBuilder, skip_registration=True):
    """Fashion-MNIST, 60000 train / 10000 test, upstream order."""

    URL = _FASHION_URL
    HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
    CLASS_NAMES = (
        "t-shirt/top", "trouser", "pullover", "dress", "coat",
        "sandal", "shirt", "sneaker", "bag", "ankle boot",
    )  # fmt: skip
    FINGERPRINTS = {
        "train_images": "2e487a6c89124f78",
        "train_labels": "657fbd221bfc9f41",
        "test_images": "c867c93ff9536059",
        "test_labels": "3d0e6c6ea990b53b",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put the four Fashion-MNIST IDX files ({', '.join(_IDX_FILES.values())}) from "
        f"{_FASHION_URL} into the manual directory."
    )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise _read_error(path, e) from e


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR python batches: plain containers and numpy arrays only.

    The official archives are pickles; refusing every other global means a tampered or
    unexpected file fails loudly instead of executing code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} (a CIFAR batch holds only numpy arrays and "
                "plain containers; nothing was run)"
            )
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"  # numpy>=2 name; avoids a deprecation warning.
        return super().find_class(module, name)


def _unpickle(data: bytes, source: str) -> dict[str, Any]:
    """Decodes one CIFAR pickle; `source` names where it came from for the error message."""
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    # Untrusted bytes can fail inside pickle in many ways (UnpicklingError, EOFError, ValueError
    # from a refused or malformed opcode, TypeError from bad arguments to the allowed numpy
    # globals); all of them mean the same thing here: not a CIFAR batch.
    except Exception as e:
        raise DataSourceError(source, f"not a CIFAR python batch: {e}") from e
    if not isinstance(obj, dict):
        raise DataSourceError(source, f"holds a {type(obj).__name__}, not a CIFAR batch dict")
    # Python-2 pickles come back with bytes keys; normalise so both kinds read the same.
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


class _CifarBuilder(_CamuBuilder, skip_registration=True):
    """CIFAR python-pickle archives, as the .tar.gz or already extracted, in manual_dir."""

    IMAGE_SHAPE = (32, 32, 3)
    HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
    ARCHIVE: ClassVar[str]
    ARCHIVE_MD5: ClassVar[str]  # The upstream archive's, as published on the homepage.
    FOLDER: ClassVar[str]
    TRAIN_MEMBERS: ClassVar[tuple[str, ...]]
    TEST_MEMBERS: ClassVar[tuple[str, ...]]
    META_MEMBER: ClassVar[str]
    LABEL_KEY: ClassVar[str]
    NAMES_KEY: ClassVar[str]

    @classmethod
    def _members(cls) -> tuple[str, ...]:
        return (*cls.TRAIN_MEMBERS, *cls.TEST_MEMBERS, cls.META_MEMBER)

    def _read_members(self, dl_manager) -> dict[str, tuple[str, bytes]]:
        """`{member: (where it was read, for error messages), its bytes}`."""
        manual = self._manual_path(dl_manager)
        # Accept an extracted folder (`<manual>/<FOLDER>/...` or the files directly in
        # `<manual>`) before the archive, since extracting is what most users have done.
        for folder in (manual / self.FOLDER, manual):
            if all((folder / m).is_file() for m in self._members()):
                return {m: (str(folder / m), _read_bytes(folder / m)) for m in self._members()}
        archive = manual / self.ARCHIVE
        if not archive.is_file():
            raise self._missing_files_error(manual, [self.ARCHIVE])
        return self._read_archive(archive)

    def _read_archive(self, archive: Path) -> dict[str, tuple[str, bytes]]:
        wanted = {f"{self.FOLDER}/{m}": m for m in self._members()}
        found: dict[str, tuple[str, bytes]] = {}
        try:
            with tarfile.open(archive, "r:*") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    key = wanted.get(name)
                    if key is not None and member.isfile():
                        found[key] = (f"{archive} (member {name})", tar.extractfile(member).read())
                # tarfile stops at the end-of-archive blocks, before the gzip trailer; reading on
                # to the end makes the gzip layer check the CRC that would catch a damaged byte.
                while tar.fileobj.read(1 << 20):
                    pass
        # Besides TarError, a damaged or truncated .gz surfaces from the gzip layer as
        # BadGzipFile (an OSError), zlib.error or EOFError.
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise _read_error(archive, e) from e
        missing = [n for n, m in wanted.items() if m not in found]
        if missing:
            raise FileNotFoundError(f"{self.name}: archive {archive} lacks {', '.join(missing)}")
        return found

    def _decode(self, blobs: list[tuple[str, bytes]]) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for source, blob in blobs:
            batch = _unpickle(blob, source)
            try:
                # Rows are 3072 bytes, channel-major (1024 R, 1024 G, 1024 B): NCHW -> NHWC.
                data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                label = np.asarray(batch[self.LABEL_KEY], dtype=np.int64).reshape(-1)
            except KeyError as e:
                raise DataSourceError(source, f"CIFAR batch lacks the key {e}") from e
            except (ValueError, TypeError) as e:
                raise DataSourceError(source, f"CIFAR batch has malformed data: {e}") from e
            images.append(data.transpose(0, 2, 3, 1))
            labels.append(label)
        return np.concatenate(images), np.concatenate(labels)

    def _split_generators(self, dl_manager):
        members = self._read_members(dl_manager)
        train = self._decode([members[m] for m in self.TRAIN_MEMBERS])
        test = self._decode([members[m] for m in self.TEST_MEMBERS])
        meta_source, meta_blob = members[self.META_MEMBER]
        names = _unpickle(meta_blob, meta_source).get(self.NAMES_KEY)
        if names is not None:
            if len(names) != self.NUM_CLASSES:
                raise ValueError(f"{self.name}: meta lists {len(names)} class names")
            self.info.metadata["class_names"] = [
                n.decode() if isinstance(n, bytes) else str(n) for n in names
            ]
        return self._splits(train, test)


class CamuCifar10(_CifarBuilder, skip_registration=True):
    """CIFAR-10, 50000 train (data_batch_1..5 in order) / 10000 test."""

    NUM_CLASSES = catalog.info("cifar10").num_classes
    CLASS_NAMES = (
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    )  # fmt: skip
    ARCHIVE = "cifar-10-python.tar.gz"
    ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
    FOLDER = "cifar-10-batches-py"
    TRAIN_MEMBERS = tuple(f"data_batch_{i}" for i in range(1, 6))
    TEST_MEMBERS = ("test_batch",)
    META_MEMBER = "batches.meta"
    LABEL_KEY = "labels"
    NAMES_KEY = "label_names"
    REQUIRED_FILES = {"archive": ARCHIVE}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put {ARCHIVE} from {_CIFAR_URL}{ARCHIVE} (or its extracted folder {FOLDER}/) into "
        "the manual directory."
    )


class CamuCifar100(_CifarBuilder, skip_registration=True):
    """CIFAR-100 with the 100 fine labels, 50000 train / 10000 test."""

    NUM_CLASSES = catalog.info("cifar100").num_classes
    # Placeholder: the real fine-label names come from the archive's `meta` at prepare time.
    CLASS_NAMES = tuple(str(i) for i in range(100))
    ARCHIVE = "cifar-100-python.tar.gz"
    ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
    FOLDER = "cifar-100-python"
    TRAIN_MEMBERS = ("train",)
    TEST_MEMBERS = ("test",)
    META_MEMBER = "meta"
    LABEL_KEY = "fine_labels"
    NAMES_KEY = "fine_label_names"
    REQUIRED_FILES = {"archive": ARCHIVE}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put {ARCHIVE} from {_CIFAR_URL}{ARCHIVE} (or its extracted folder {FOLDER}/) into "
        "the manual directory."
    )


BUILDERS: dict[str, type[_CamuBuilder]] = {
    "digits": CamuDigits,
    "mnist": CamuMnist,
    "fashion_mnist": CamuFashionMnist,
    "cifar10": CamuCifar10,
    "cifar100": CamuCifar100,
}
