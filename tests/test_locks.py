"""One writer at a time: the work dir of a run, and a model's checkpoint directory."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from camu_jax import checkpointing
from camu_jax.models import create_model, init_variables
from camu_jax.training import TrainConfig, train_model

ROOT = Path(__file__).resolve().parents[1]
N = 96
# A process that holds a directory's lock until its stdin closes.
HOLD = """
import sys
from camu_jax import checkpointing
lock = checkpointing.lock_directory(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


def _hold(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
    )
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        pytest.fail(f"the holder did not lock {directory}: {proc.communicate()[1][-3000:]}")
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=60)


def test_a_locked_directory_is_refused_naming_the_holder_until_it_dies(tmp_path):
    holder = _hold(tmp_path / "d")
    try:
        with pytest.raises(checkpointing.DirectoryInUseError) as e:
            checkpointing.lock_directory(tmp_path / "d")
        assert f"pid {holder.pid} " in str(e.value) and str(tmp_path / "d") in str(e.value)
        holder.send_signal(signal.SIGKILL)  # the OS releases the lock of a killed holder
        holder.wait(timeout=60)
        with checkpointing.lock_directory(tmp_path / "d"):
            who = json.loads((tmp_path / "d" / ".lock").read_text())
            assert who["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


def test_a_waiter_blocks_until_the_holder_releases(tmp_path):
    holder = _hold(tmp_path / "d")
    try:
        threading.Timer(1.0, holder.stdin.close).start()
        said, t0 = [], time.monotonic()
        lock = checkpointing.lock_directory(tmp_path / "d", wait=True, on_wait=said.append)
        assert time.monotonic() - t0 > 0.9
        assert holder.wait(timeout=60) == 0
        (line,) = said
        assert line.startswith(f"waiting for {tmp_path / 'd'}: pid {holder.pid} "), line
        lock.release()
        # Released: anyone gets it at once.
        checkpointing.lock_directory(tmp_path / "d").release()
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture(scope="module")
def problem(random_images_96):
    return random_images_96


def _train(problem, ckpt):
    m = create_model("cnn", num_classes=10)
    return train_model(
        m,
        init_variables(m, jax.random.key(0), (8, 8, 1)),
        data=problem,
        items=np.arange(N),
        config=TrainConfig(epochs=1),
        seed=0,
        checkpoint_dir=ckpt,
        meta={"model": "cnn"},
        progress=False,
    )


def test_training_waits_for_a_model_another_run_trains_then_restores_it(problem, tmp_path, capsys):
    done, _ = _train(problem, tmp_path / "other")  # what the other run will have saved
    ckpt = tmp_path / "ck"
    holder = _hold(ckpt)  # the other run, training into ck
    out = {}
    thread = threading.Thread(target=lambda: out.update(result=_train(problem, ckpt)))
    try:
        thread.start()
        said, deadline = "", time.monotonic() + 120
        while "waiting for" not in said and time.monotonic() < deadline:
            time.sleep(0.05)
            said += capsys.readouterr().out
        assert f"waiting for {ckpt}: pid {holder.pid} " in said
        assert thread.is_alive() and not checkpointing.latest_step(ckpt)
        # The other run finishes: its checkpoint is in place, then its lock goes.
        shutil.copytree(
            tmp_path / "other", ckpt, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock")
        )
        _release(holder)
        thread.join(timeout=120)
        variables, info = out["result"]
        assert info["epochs_run"] == 0  # restored, not trained again
        for x, y in zip(jax.tree.leaves(variables), jax.tree.leaves(done), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    finally:
        holder.kill()
        holder.wait()
        thread.join(timeout=120)


def test_a_second_run_on_a_work_dir_exits_2_naming_the_first(tmp_path):
    workdir = tmp_path / "wd"
    cmd = [sys.executable, "-m", "experiments.unlearn", "--no-progress", "--workdir", str(workdir)]
    cmd += ["--original-epochs", "1", "--no-relearn"]
    first = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 600
        while not (workdir / "splits").is_dir():  # written once the run holds its work dir
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # frozen: still holds the work dir for sure
        try:
            second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-3000:]
        (line,) = [x for x in second.stderr.splitlines() if x.startswith("error:")]
        assert f"{workdir} is in use" in line and f"pid {first.pid} " in line, line
        out, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-3000:]
        assert json.loads((workdir / "results.json").read_text())["runs"]
    finally:
        first.kill()
        first.wait()
