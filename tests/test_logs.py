"""Step logs (`camu_jax.logs`): the main job writes every phase's per-step losses and learning
rates per member as TensorBoard event files and CSV under `<workdir>/logs/`, and results.json
keeps their per-epoch means. The event files are read back here from their bytes (TFRecord
framing, then the Event protobuf), not with the writer's own code."""

import csv
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from camu_jax import logs

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("original", "retrain", "camu")


def read_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """`{tag: [(step, value)]}` of every scalar in the folder's event files. A TFRecord is
    `uint64 length, uint32 crc, data, uint32 crc`; each record's data is an `Event`. Both
    checksums are checked with tensorboardX's CRC-32C, as TensorBoard's reader checks them."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto import event_pb2

    def masked(data: bytes) -> int:
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    out: dict[str, list] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            (head_crc,) = struct.unpack("<I", data[at + 8 : at + 12])
            body = data[at + 12 : at + 12 + length]
            (body_crc,) = struct.unpack("<I", data[at + 12 + length : at + 16 + length])
            assert head_crc == masked(data[at : at + 8]), (path, at)
            assert body_crc == masked(body), (path, at)
            event = event_pb2.Event.FromString(body)
            at += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("logs")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.unlearn",
            "--no-progress",
            "--workdir",
            str(workdir),
            "--original-epochs",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, json.loads((workdir / "results.json").read_text())


def test_event_files_hold_every_step_and_average_to_results_json(job):
    workdir, results = job
    (run,) = results["runs"]
    for method in METHODS:
        epochs = run["losses"][method]
        assert epochs, method
        folder = workdir / run["logs"][method]
        assert folder.parent.parent == workdir / "logs", folder
        events = read_events(folder)
        stage = epochs[0]["stage"]
        keys = [k for k in epochs[0] if k not in ("stage", "epoch", "steps")]
        assert {f"{stage}/{k}" for k in keys} == set(events), (method, set(events))
        total = sum(e["steps"] for e in epochs)
        for key in keys:
            steps, values = zip(*events[f"{stage}/{key}"], strict=True)
            assert list(steps) == list(range(1, total + 1)), (method, key)
            values, lo = np.asarray(values, np.float64), 0
            for e in epochs:
                mean = values[lo : lo + e["steps"]].mean()
                # Events hold float32 values; results.json the float64 means of the steps.
                assert mean == pytest.approx(e[key], rel=1e-5, abs=1e-7), (method, key, e)
                lo += e["steps"]
    original = run["losses"]["original"]
    assert [e["epoch"] for e in original] == [1, 2]
    assert all(e["learning_rate"] == 1e-3 for e in original)
    camu = run["losses"]["camu"][0]
    assert {"loss_rep", "loss_out", "kl_lr", "impair_lr"} <= set(camu)


def test_csv_columns_and_rows(job):
    workdir, results = job
    (run,) = results["runs"]
    for method in METHODS:
        epochs = run["losses"][method]
        stage = epochs[0]["stage"]
        keys = [k for k in epochs[0] if k not in ("stage", "epoch", "steps")]
        with open(workdir / run["logs"][method] / f"{stage}.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["step", "epoch", *keys]
        body = np.asarray(rows[1:], np.float64)
        assert body[:, 0].tolist() == list(range(1, len(body) + 1))
        lo = 0
        for e in epochs:
            part = body[lo : lo + e["steps"]]
            assert (part[:, 1] == e["epoch"]).all()
            for c, key in enumerate(keys, start=2):
                # The CSV keeps float64 text: its means are results.json's.
                assert part[:, c].mean() == pytest.approx(e[key], rel=1e-12), (method, key)
            lo += e["steps"]
        assert lo == len(body)


def test_relearning_and_every_phase_log(job):
    workdir, results = job
    phases = {p.name for p in (workdir / "logs").iterdir()}
    assert phases == {"original", "retrain", "camu", "relearn"}
    relearned = sorted(p.name for p in (workdir / "logs" / "relearn").iterdir())
    assert len(relearned) == 2 and relearned[0].startswith("camu_")
    # results.json keeps the relearning's per-epoch means too, beside each curve; they are
    # the means of the CSV's steps.
    (run,) = results["runs"]
    camu_log = workdir / "logs" / "relearn" / relearned[0]
    epochs = run["relearn"]["camu"]["losses"]
    assert epochs and all(e["steps"] > 0 for e in epochs)
    stage = epochs[0]["stage"]
    with open(camu_log / f"{stage}.csv", newline="") as f:
        rows = list(csv.reader(f))
    column = rows[0].index("loss")
    body = np.asarray(rows[1:], np.float64)
    lo = 0
    for e in epochs:
        assert body[lo : lo + e["steps"], column].mean() == pytest.approx(e["loss"], rel=1e-12)
        lo += e["steps"]
    assert lo == len(body)


def test_member_log_resumes_where_its_checkpoint_ended(tmp_path):
    log = logs.MemberLog(tmp_path / "m")
    log.write("train", 1, np.arange(1, 11), {"loss": np.linspace(1, 0, 10)})
    log.close()
    # Resumed from a checkpoint after step 6: steps 7..10 of the killed session go.
    log = logs.MemberLog(tmp_path / "m", resume_step=6)
    log.write("train", 2, np.arange(7, 9), {"loss": np.asarray([5.0, 6.0])})
    log.close()
    with open(tmp_path / "m" / "train.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert float(rows[-1][2]) == 6.0 and rows[-1][1] == "2"
    # The events: the new file starts with a SessionLog.START at step 7, so TensorBoard drops
    # the old file's steps 7..10 (tensorboardX's purge_step).
    from tensorboardX.proto import event_pb2

    events = read_events(tmp_path / "m")
    assert [s for s, _ in events["train/loss"]] == [*range(1, 11), 7, 8]
    newest = max((tmp_path / "m").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns)
    data, records, at = newest.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        records.append(event_pb2.Event.FromString(data[at + 12 : at + 12 + length]))
        at += 16 + length
    assert records[0].file_version == "brain.Event:2"
    assert records[1].step == 7
    assert records[1].session_log.status == event_pb2.SessionLog.START
    # Starting from scratch clears the folder's earlier logs.
    logs.MemberLog(tmp_path / "m").close()
    assert not list((tmp_path / "m").iterdir())


def test_crc32c_is_castagnoli():
    from tensorboardX.crc32c import crc32c

    assert logs.crc32c(b"123456789") == 0xE3069283  # the standard check value
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 100):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert logs.crc32c(data) == crc32c(data), n


def test_folder_names_and_learning_rates():
    assert logs.folder("ft[learning_rate=0.1,momentum=0.9] run 0") == (
        "ft@learning_rate=0.1+momentum=0.9_run_0"
    )
    with logs.log_to("somewhere"):
        assert logs.member_folder("camu", "camu class-0-seed0") == Path(
            "somewhere/camu/class-0-seed0"
        )
    assert logs.member_folder("camu", "x") is None
    from camu_jax import methods

    assert logs.learning_rates(methods.get("camu")) == {"kl_lr": 4e-4, "impair_lr": 1e-3}
    assert set(logs.learning_rates(methods.get("ft"))) == {"learning_rate"}
