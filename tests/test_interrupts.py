"""Stopping the main job: its evaluation workers end with it, and Ctrl-C or SIGTERM ends it
within seconds with one line."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None when it has gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _workers(parent: int) -> set[int]:
    """The loky worker processes that `parent` started."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (stat := _proc_stat(int(entry.name))) is None:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == parent and b"popen_loky_posix" in cmdline:
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie has ended


def _start(tmp_path: Path):
    """The main job with two evaluation workers, once both exist (the originals are being
    scored while the retrains train); returns it, its stderr file and the workers."""
    err = tmp_path / "stderr"
    with open(err, "ab") as f:  # appended to by the job alone
        proc = subprocess.Popen(
            [sys.executable, "-m", "experiments.unlearn", "--no-progress", "--eval-workers", "2"]
            # Two runs: two models per phase to score, one per worker.
            + ["--seeds", "0,1", "--original-epochs", "1", "--no-relearn"]
            + ["--workdir", str(tmp_path / "wd")],
            stdout=subprocess.DEVNULL,
            stderr=f,
            cwd=ROOT,
        )
    deadline = time.monotonic() + 600
    while len(workers := _workers(proc.pid)) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no evaluation workers seen: {err.read_text()[-3000:]}")
        time.sleep(0.02)
    return proc, err, workers


def _assert_gone(workers: set[int], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while (alive := {p for p in workers if _alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:  # no stray processes, whatever the outcome
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {sorted(alive)} outlived their parent by {seconds} s"


def test_workers_die_with_a_killed_run(tmp_path):
    proc, _, workers = _start(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _assert_gone(workers)


@pytest.mark.parametrize(
    ("signum", "line"), [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")]
)
def test_a_signal_stops_the_run_with_one_line(tmp_path, signum, line):
    proc, err, workers = _start(tmp_path)
    before = err.stat().st_size  # what the job wrote to stderr before the signal
    t0 = time.monotonic()
    proc.send_signal(signum)
    try:
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
    seconds = time.monotonic() - t0
    after = err.read_bytes()[before:].decode(errors="replace")
    _assert_gone(workers)
    assert code == 128 + signum, after[-3000:]
    assert after == f"{line}\n", after[-3000:]
    assert seconds < 8, seconds
