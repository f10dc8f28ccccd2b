"""A study across two JAX processes (`jax.distributed`, gloo collectives on CPU) computes what
one process computes.

Two local processes with one CPU device each run the main job on digits (two seeds: two
members in the original, retrain and CaMU phases, six in the evaluation, four relearning) and
are compared with one process holding two CPU devices. Both build the same `(member 2, data 1)`
mesh, so every device runs the same partitioned programs on the same members; what crosses
processes is copied (`process_allgather`; float64 metrics travel as their uint32 words) and the
host metrics are the same numpy code on the same logits. Every metric is therefore asserted
equal, bit for bit: no tolerance is needed, and any difference is a bug.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from camu_jax import evaluation
from camu_jax.results import TIME_KEYS

ROOT = Path(__file__).resolve().parents[1]
MAIN = ("-m", "experiments.unlearn")
# Two runs, two members per wave: one member per device in one process as in two, so both
# run the same programs. (A single process otherwise chooses its layout by timing, and one
# member at a time on one device is another program, which rounds differently in its last
# bits on XLA:CPU's legacy emitters.)
STUDY = (
    "--original-epochs",
    "1",
    "--seeds",
    "0,1",
    "--population-size",
    "2",
    "--no-progress",
    "--xla-cache",
    "",
)
TIMEOUT = 900  # seconds for one launch; both processes are killed when it passes
# Wall clock, not results.
TIMINGS = TIME_KEYS  # every time key of a model's entry (wall clock)
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")

pytestmark = pytest.mark.slow


def _env(devices: int, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*DISTRIBUTED_ENV, "CAMU_DISTRIBUTED")}
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),  # this checkout's camu_jax, not an installed copy
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        **extra,
    )
    env.pop("JAX_ENABLE_X64", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(jobs: list[tuple[list[str], dict]], logs: Path) -> list[tuple[int, str, str]]:
    """Starts every `(argv, env)` job at once (argv after `python`), waits for all of them, and
    returns `(exit code, stdout, stderr)` per job. When one fails, or `TIMEOUT` passes, every
    job still running is killed (with its joblib workers): a process whose peer is gone would
    otherwise wait in a collective."""
    procs = []
    try:
        for k, (args, env) in enumerate(jobs):
            out, err = (open(logs / f"{k}.{s}", "w") for s in ("out", "err"))  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [sys.executable, *args],
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,  # its own process group, killed as one
                )
            )
            out.close()
            err.close()
        deadline = time.monotonic() + TIMEOUT
        while any(p.poll() is None for p in procs):
            failed = any(p.returncode not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [
        (p.returncode, (logs / f"{k}.out").read_text(), (logs / f"{k}.err").read_text())
        for k, p in enumerate(procs)
    ]


def _process_env(port: int, i: int) -> dict:
    """Process `i` of two, one CPU device each."""
    return _env(
        1,
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(i),
    )


def _two_processes(
    tmp: Path, name: str, *args: str, checkpoints: tuple[str, str] = ("ckpt", "ckpt")
) -> tuple[list, list[Path]]:
    """The study on two processes: each its own workdir (so what each writes can be told
    apart), by default one shared checkpoint directory (as on a shared filesystem)."""
    port = _free_port()
    workdirs = [tmp / name / f"process{i}" for i in range(2)]
    jobs = [
        (
            [*MAIN, *STUDY, *args, "--workdir", str(w), "--checkpoint-dir", str(tmp / c)],
            _process_env(port, i),
        )
        for i, (w, c) in enumerate(zip(workdirs, checkpoints, strict=True))
    ]
    logs = tmp / f"{name}-logs"
    logs.mkdir()
    return _launch(jobs, logs), workdirs


def _check_exits(outcomes: list) -> None:
    for i, (code, _, err) in enumerate(outcomes):
        assert code == 0, f"process {i} exited {code}:\n{err[-4000:]}"


def _results(workdir: Path) -> list[dict]:
    """Per run: every metric of every method, the relearning curves, the run's identity;
    without the wall-clock timings."""
    runs = json.loads((workdir / "results.json").read_text())["runs"]
    for run in runs:
        for values in run["methods"].values():
            for key in TIMINGS:
                values.pop(key, None)
        # The per-epoch loss means are the steps' own: a layout of other programs (two
        # members on two processes' devices against one device) rounds them in their last
        # digits (relative 1e-8 to 3e-5 measured) while every metric agrees exactly; their
        # schedule (stages, epochs, steps, learning rates) is compared apart (`_schedules`).
        run.pop("losses", None)
        run.pop("logs", None)  # where step logs went (none for a restored model)
        for curve in (run.get("relearn") or {}).values():
            curve.pop("losses", None)
    return runs


def _schedules(workdir: Path) -> list[dict]:
    """Per run and model, each epoch's record without its loss values: stage, epoch, steps
    and learning rates, which do not depend on how the programs round."""
    runs = json.loads((workdir / "results.json").read_text())["runs"]

    def plain(epochs):
        return [{k: v for k, v in e.items() if "loss" not in k and "ce_" not in k} for e in epochs]

    return [
        {
            **{m: plain(e) for m, e in run.get("losses", {}).items()},
            **{
                f"relearn {m}": plain(c.get("losses", []))
                for m, c in run.get("relearn", {}).items()
            },
        }
        for run in runs
    ]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same study in one process with two CPU devices: the same mesh and layout."""
    tmp = tmp_path_factory.mktemp("single")
    logs = tmp / "logs"
    logs.mkdir()
    ((code, _, err),) = _launch([([*MAIN, *STUDY, "--workdir", str(tmp / "run")], _env(2))], logs)
    assert code == 0, err[-4000:]
    return tmp / "run"


def test_two_processes_compute_one_process_results(single, tmp_path):
    outcomes, (zero, one) = _two_processes(tmp_path, "first")
    _check_exits(outcomes)
    results = json.loads((zero / "results.json").read_text())
    assert results["mesh"] == {"member": 2, "data": 1}
    assert len(results["devices"]) == 2
    expected = _results(single)
    assert [r["seed"] for r in expected] == [0, 1]
    assert all(r["relearn"]["camu"]["batches"] for r in expected)
    assert _results(zero) == expected
    assert _schedules(zero) == _schedules(single)
    assert all(run["original"] and run["relearn camu"] for run in _schedules(single))
    # Process 0 alone writes results, reports and splits, and reports on stdout.
    assert (zero / "results.md").exists() and len(list((zero / "splits").iterdir())) == 2
    assert sorted(one.rglob("*")) == []
    assert "phases:" in outcomes[0][1] and "phases:" not in outcomes[1][1]

    # A second launch: both processes restore the checkpoints process 0 wrote.
    outcomes, (zero, _) = _two_processes(tmp_path, "resumed", "--no-relearn")
    _check_exits(outcomes)
    phases = json.loads((zero / "results.json").read_text())["phases"]
    assert phases[0]["restored"] and phases[1]["restored"]
    for run in expected:
        del run["relearn"]
    assert _results(zero) == expected

    # Checkpoints that only one process sees (no shared filesystem) would make the processes
    # run different programs and wait on each other forever: both stop, naming the cause.
    outcomes, (zero, _) = _two_processes(tmp_path, "unshared", checkpoints=("ckpt", "empty"))
    for code, _, err in outcomes:
        assert code == 2, err[-3000:]
        (line,) = [x for x in err.splitlines() if x.startswith("error:")]
        assert line.startswith("error: the processes disagree on the epochs already done"), err
        assert "process 0: [1, 1]; process 1: [0, 0]" in line and "shares" in line, err
    assert not zero.exists() or sorted(zero.rglob("*.json")) == []


def test_each_process_scores_its_own_models(tmp_path):
    port = _free_port()
    script = str(ROOT / "tests" / "multidevice" / "two_processes.py")
    outcomes = _launch([([script], _process_env(port, i)) for i in range(2)], tmp_path)
    _check_exits(outcomes)
    # The last line: gloo prints its own lines to stdout.
    out = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in outcomes]
    assert [o["process"] for o in out] == [0, 1]
    # Members are split in order over the member axis: process 0 holds the first two.
    assert out[0]["owners"] == out[1]["owners"] == [0, 0, 1, 1]
    assert out[0]["scored"] == [10, 11] and out[1]["scored"] == [12, 13]
    assert out[0]["scores"] == out[1]["scores"]
    assert all(set(s) == set(evaluation.METRIC_KEYS) for s in out[0]["scores"])
    sent = np.asarray([[i / 3, 1e-310, np.nan] for i in range(4)]).view(np.uint64).tolist()
    assert out[0]["gathered"] == out[1]["gathered"] == sent


def test_bad_process_count_is_named(tmp_path):
    env = _env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="two")
    proc = subprocess.run(
        [sys.executable, *MAIN, *STUDY, "--workdir", str(tmp_path / "w")],
        cwd=ROOT,
        env={**env, "JAX_PROCESS_ID": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == ["error: JAX_NUM_PROCESSES='two' is not an integer"]
    assert not (tmp_path / "w" / "results.json").exists()
