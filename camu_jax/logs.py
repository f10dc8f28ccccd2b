"""Step logs: every phase's per-step losses and learning rates, per member, as TensorBoard event
files and CSV files, and the per-epoch means that results.json keeps.

Logging is on inside `log_to(root)`: there, every phase the wave runner (`camu_jax.runner`)
runs writes for each member a folder `<root>/<phase>/<member>/` (names as `folder` spells
them) holding

* `events.out.tfevents.*` (TensorBoard's format, written here: no TensorFlow, and no
  tensorboardX, whose import pulls in PyTorch where it is installed, a second per process):
  a scalar `<stage>/<key>` per step for each metric the step returns (`loss`, CaMU's
  `loss_rep` and `loss_out`...) and each learning rate (`learning_rate`, CaMU's `kl_lr` and
  `impair_lr`...), at the member's step, counted from 1 over the whole phase (its stages one
  after another), one Event per step holding them all;
* `<stage>.csv`: a row per step: `step, epoch, <metric keys...>, <learning-rate keys...>`.

Steps are logged one by one: the engine returns every step's metrics (`[k, members]` host
arrays per chunk, the scanned chunks of an accelerator included), so nothing is averaged
before it is written. A step's learning rates are the member's learning-rate settings
(`learning_rates`: every float setting named `learning_rate` or `*_lr`), times the plan's
per-step `lr_scale` where a method schedules its rate through the plan (SCRUB's decay).

A member resumed from a checkpoint at step S keeps the rows and events of steps <= S (the CSV
is cut there; the new event file purges later steps, TensorBoard's `purge_step`); a member
that starts from scratch clears its folder's earlier logs. Only process 0 writes.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import dataclasses
import os
import re
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("camu_jax_logs", default=None)


@contextlib.contextmanager
def log_to(root: str | Path | None) -> Iterator[Path | None]:
    """Inside the block, every phase writes its step logs under `root` (None: nowhere)."""
    token = _ROOT.set(None if root is None else Path(root))
    try:
        yield _ROOT.get()
    finally:
        _ROOT.reset(token)


def root() -> Path | None:
    """Where step logs go now (`log_to`), or None."""
    return _ROOT.get()


def folder(name: str) -> str:
    """A phase's or member's folder name: `ft[learning_rate=0.1] run 0` ->
    `ft@learning_rate=0.1_run_0` (no glob characters, spaces or separators)."""
    name = name.replace("[", "@").replace("]", "").replace(",", "+")
    return re.sub(r"[^A-Za-z0-9._=+@-]+", "_", name).strip("_") or "_"


def member_folder(phase: str, member: str) -> Path | None:
    """`<root>/<phase>/<member>` of the current `log_to` (the phase's name dropped from the
    front of the member's), or None when logging is off."""
    base = root()
    if base is None:
        return None
    if member.startswith(phase + " "):
        member = member[len(phase) + 1 :]
    return base / folder(phase) / folder(member)


def learning_rates(config) -> dict[str, float]:
    """The learning-rate settings of a config (a dataclass; nested ones included): every
    float field named `learning_rate` or ending in `_lr`."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(learning_rates(value))
        elif (f.name == "learning_rate" or f.name.endswith("_lr")) and isinstance(
            value, int | float
        ):
            out[f.name] = float(value)
    return out


class EpochMeans:
    """Sums of each key over a member's steps of one epoch; `record` gives their means."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.steps = 0

    def add(self, values: Mapping[str, np.ndarray]) -> None:
        """`values`: `{key: [n]}` over n steps."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(np.sum(np.asarray(v, np.float64)))
        if values:
            self.steps += len(next(iter(values.values())))

    def record(self, stage: str, epoch: int) -> dict | None:
        """`{'stage', 'epoch' (1-based, of the stage), 'steps', key: mean...}`, or None when
        no step was added."""
        if not self.steps:
            return None
        return {
            "stage": stage,
            "epoch": epoch,
            "steps": self.steps,
            **{k: s / self.steps for k, s in self.sums.items()},
        }


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, the checksum of TFRecord framing."""
    crc, table = 0xFFFFFFFF, _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    """One TFRecord: `uint64 length, uint32 masked crc of it, data, uint32 masked crc of it`."""
    length = struct.pack("<Q", len(data))
    return b"".join(
        (length, struct.pack("<I", _masked_crc(length)), data, struct.pack("<I", _masked_crc(data)))
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, body: bytes) -> bytes:
    """`tensorboard.Event` (event.proto): wall_time = 1 (double), step = 2 (int64), then
    `body` (file_version = 3, summary = 5 or session_log = 7, already encoded)."""
    return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + body


def _scalars(step: int, values: Mapping[str, float], wall_time: float) -> bytes:
    """An Event whose Summary (field 5) holds a `Value` per tag: tag = 1, simple_value = 2
    (float), as TensorBoard's scalar dashboard reads them."""
    summary = b"".join(
        _field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
        for tag, value in values.items()
    )
    return _event(wall_time, step, _field(5, summary))


class EventFile:
    """A TensorBoard event file in `directory`: its first record names the format
    (`brain.Event:2`); `purge_step` (a resumed run's first new step) adds a
    `SessionLog.START` there, so TensorBoard drops the earlier files' events from that step on,
    as tensorboardX's `purge_step` does."""

    def __init__(self, directory: Path, purge_step: int | None = None):
        now = time.time()
        self.path = Path(directory) / (
            f"events.out.tfevents.{now:.6f}.{socket.gethostname()}.{os.getpid()}"
        )
        records = [_record(_event(now, 0, _field(3, b"brain.Event:2")))]
        if purge_step:
            records.append(_record(_event(now, purge_step, _field(7, b"\x08\x01"))))
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed in `close`)
        self._file.write(b"".join(records))

    def write(self, rows: list[tuple[int, Mapping[str, float]]]) -> None:
        """One Event per `(step, {tag: value})`, written and flushed together."""
        now = time.time()
        self._file.write(b"".join(_record(_scalars(s, v, now)) for s, v in rows))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MemberLog:
    """One member's step logs in `directory` (module docstring); `resume_step`: the steps it
    ran before (restored), whose logs are kept."""

    def __init__(self, directory: Path, resume_step: int = 0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.resume_step = resume_step
        if resume_step == 0:
            for pattern in ("events.out.tfevents.*", "*.csv"):
                for old in self.directory.glob(pattern):
                    old.unlink()
        self._writer = None
        self._csv: dict[str, tuple] = {}  # stage -> (file, writer, columns)

    def _events(self) -> EventFile:
        if self._writer is None:
            self._writer = EventFile(
                self.directory, purge_step=self.resume_step + 1 if self.resume_step else None
            )
        return self._writer

    def _table(self, stage: str, columns: list[str]):
        if stage not in self._csv:
            path = self.directory / f"{folder(stage)}.csv"
            kept = []
            if self.resume_step and path.exists():
                with open(path, newline="") as f:
                    rows = list(csv.reader(f))
                if rows and rows[0] == columns:
                    kept = [r for r in rows[1:] if r and int(r[0]) <= self.resume_step]
            f = open(path, "w", newline="")  # noqa: SIM115 (closed in `close`)
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(kept)
            self._csv[stage] = (f, writer, columns)
        return self._csv[stage]

    def write(self, stage: str, epoch: int, steps: np.ndarray, values: Mapping[str, np.ndarray]):
        """Logs `values[key][s]` at step `steps[s]` (the member's step numbers) of `epoch`
        (1-based) of `stage`."""
        keys = list(values)
        f, writer, columns = self._table(stage, ["step", "epoch", *keys])
        if columns[2:] != keys:
            raise ValueError(f"{stage}: logged {keys}, but its CSV holds {columns[2:]}")
        host = {k: np.asarray(v, np.float64).tolist() for k, v in values.items()}
        tags = [f"{stage}/{k}" for k in keys]
        events = []
        for s, step in enumerate(np.asarray(steps).tolist()):
            row = [host[k][s] for k in keys]
            events.append((step, dict(zip(tags, row, strict=True))))
            writer.writerow([step, epoch, *map(repr, row)])
        f.flush()
        self._events().write(events)

    def close(self) -> None:
        for f, _, _ in self._csv.values():
            f.close()
        self._csv = {}
        if self._writer is not None:
            self._writer.close()
            self._writer = None
