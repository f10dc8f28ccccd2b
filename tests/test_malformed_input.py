"""Malformed input gets one clear error where it enters (issue 15 items 2 and 10): report JSON
of the wrong structure, IDX headers that claim more than the dataset holds (a gzip bomb), and
library calls with no runs, images without a channel axis or train and test of different
image sizes."""

import copy
import gzip
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from camu_jax import compare, table
from camu_jax.data import DeviceData, ForgetSpec, make_splits
from camu_jax.data.builders import _IDX_FILES, DataSourceError, read_idx
from camu_jax.data.loading import load_dataset
from camu_jax.models import create_model
from camu_jax.training import TrainConfig
from experiments import report, reporting

FIXTURE = Path(__file__).parent / "fixtures" / "results_small.json"

# -- experiments.report on JSON of the wrong structure --------------------------------------


def _with_run(**fields):
    results = json.loads(FIXTURE.read_text())
    results["runs"][0].update(fields)
    return results


@pytest.mark.parametrize(
    ("results", "needle"),
    [
        ([1, 2], "non-empty 'runs' list"),
        ({"runs": [{"seed": 0}]}, "runs[0] has no 'methods'"),
        (_with_run(methods={"camu": [1, 2]}), "runs[0].methods.camu is a list"),
        (_with_run(split_sizes=[1]), "runs[0].split_sizes is a list"),
        (_with_run(relearn=[1]), "runs[0].relearn is a list"),
        (_with_run(relearn={"camu": [1]}), "runs[0].relearn.camu is a list"),
        (_with_run(relearn={"camu": {"batches": "ab", "gap": "cd"}}), "relearn.camu.batches"),
        (_with_run(forget_class={"a": 1}), "runs[0].forget_class is {'a': 1}"),
        (_with_run(seed="x"), "runs[0].seed is 'x'"),
    ],
)
def test_report_on_wrong_structure_exits_2_with_one_line(tmp_path, capsys, results, needle):
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("report: error: "), err
    assert needle in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_reports_of_classes_forgotten_together(tmp_path):
    """`--forget-class 0,1` writes `forget_class: [0, 1]`; the report writer used to raise
    TypeError (unhashable list) after the whole run."""
    results = json.loads(FIXTURE.read_text())
    for run in results["runs"]:
        run["forget_class"] = [0, 1] if run["forget_class"] == 0 else [2, 3, 4]
    written = reporting.build_reports(copy.deepcopy(results), tmp_path)
    assert {p.name for p in written} >= {"results.csv", "results.md", "per_class_accuracy.png"}
    md = (tmp_path / "results.md").read_text()
    assert "forgotten classes 0+1, 2+3+4" in md and "| 2+3+4 | CaMU |" in md
    assert "0+1," in (tmp_path / "results.csv").read_text()


# -- IDX files whose header claims more than the dataset holds ---------------------------------


def _write_gz(path: Path, header_shape: tuple[int, ...], payload_bytes: int) -> None:
    """An IDX .gz file: the header, then `payload_bytes` zeros, compressed as they go (a gzip
    bomb: ~1000:1)."""
    header = bytes([0, 0, 8, len(header_shape)]) + np.asarray(header_shape, ">u4").tobytes()
    chunk = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(header)
        for start in range(0, payload_bytes, len(chunk)):
            f.write(chunk[: min(len(chunk), payload_bytes - start)])


def _peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


BOMB_SHAPE = (160_000, 28, 28)  # 120 MiB of pixels, in ~120 KB of gzip


def test_idx_header_beyond_the_known_shape_is_refused_before_decompressing(tmp_path):
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    _write_gz(bomb, BOMB_SHAPE, int(np.prod(BOMB_SHAPE)))
    assert bomb.stat().st_size < 2**20

    def read():
        with pytest.raises(DataSourceError) as err:
            read_idx(bomb, max_shape=(60000, 28, 28))
        message = str(err.value)
        assert message.startswith(f"{bomb}: ") and "(160000, 28, 28)" in message
        assert "at most (60000, 28, 28)" in message and "\n" not in message

    assert _peak_mb(read) < 8
    # Item dims other than the dataset's are refused too, whatever the count.
    odd = tmp_path / "odd.gz"
    _write_gz(odd, (3, 32, 32), 3 * 32 * 32)
    with pytest.raises(DataSourceError, match=r"odd\.gz: IDX header says shape \(3, 32, 32\)"):
        read_idx(odd, max_shape=(60000, 28, 28))
    # A file longer than its header says is refused without reading the rest.
    long = tmp_path / "long.gz"
    _write_gz(long, (2, 28, 28), 50 * 2**20)

    def read_long():
        with pytest.raises(DataSourceError, match="long.gz: header says .* holds more than that"):
            read_idx(long)

    assert _peak_mb(read_long) < 8


def test_mnist_builder_refuses_a_gzip_bomb_naming_the_file(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    for key, name in _IDX_FILES.items():
        if key == "train_images":
            _write_gz(manual / name, BOMB_SHAPE, int(np.prod(BOMB_SHAPE)))
        else:
            shape = (3, 28, 28) if "images" in key else (3,)
            _write_gz(manual / name, shape, int(np.prod(shape)))
    data_dir = tmp_path / "tfds"

    def load():
        with pytest.raises(DataSourceError) as err:
            load_dataset("mnist", data_dir=str(data_dir), manual_dir=str(manual), progress=False)
        assert str(err.value).startswith(f"{manual / 'train-images-idx3-ubyte.gz'}: ")
        assert "at most (60000, 28, 28)" in str(err.value)

    assert _peak_mb(load) < 60  # the bomb's 120 MiB were never decompressed


# -- the library: no runs, 3-D images, train and test of different sizes -----------------------


def _data(n: int, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 1)).astype(np.uint8)
    return images, np.arange(n) % 4


def test_images_without_a_channel_axis_are_refused():
    images, labels = _data(16)
    with pytest.raises(ValueError, match=r"\[N, H, W, C\].*got shape \(16, 8, 8\)"):
        DeviceData.put(images[..., 0], labels)


@pytest.fixture(scope="module")
def problem():
    images, labels = _data(32)
    train = DeviceData.put(images, labels)
    splits = make_splits(labels, ForgetSpec(classes=(1,)), seed=0, num_classes=4)
    return create_model("cnn", num_classes=4), train, splits


TINY = TrainConfig(epochs=1, batch_size=8)


def test_compare_without_runs_is_refused(problem):
    model, train, _ = problem
    with pytest.raises(ValueError, match=r"seeds=\[\]"):
        compare(model, train=train, test=train, splits=[], seeds=[], train_config=TINY)


def test_compare_refuses_train_and_test_of_different_image_sizes(problem):
    model, train, splits = problem
    test = DeviceData.put(*_data(12, size=16, seed=1))
    with pytest.raises(ValueError, match=r"\(32, 8, 8, 1\).*\(12, 16, 16, 1\)"):
        compare(model, train=train, test=test, splits=[splits], seeds=[0], train_config=TINY)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"seeds": [0, 1]}, "1 splits but 2 seeds"),
        ({"seeds": [2**32]}, "seed 4294967296"),
        ({"seeds": [0], "methods": ["camu", "camu"]}, "camu is given 2 times"),
    ],
)
def test_compare_refuses_bad_runs_before_training(problem, kwargs, needle):
    model, train, splits = problem
    with pytest.raises(ValueError, match=needle):
        compare(model, train=train, test=train, splits=[splits], train_config=TINY, **kwargs)


def test_table_of_no_runs_is_refused():
    with pytest.raises(ValueError, match="at least one run"):
        table([])
