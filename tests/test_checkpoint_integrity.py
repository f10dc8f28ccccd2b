"""Checkpoints that cannot lie: a digest of the saved bytes, the trained model's full identity,
and damaged step folders named in the error; refusing never deletes anything."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from camu_jax import checkpointing
from camu_jax.models import create_model, init_variables
from camu_jax.steps import adam_l2, init_train_state

ROOT = Path(__file__).resolve().parents[1]


def _state():
    cnn = create_model("cnn", num_classes=10)
    return init_train_state(init_variables(cnn, jax.random.key(0), (8, 8, 1)), adam_l2(1e-3))


def _restore(directory, state):
    return checkpointing.restore(
        directory, abstract_state=checkpointing.abstract_like(state), expected_meta={"model": "cnn"}
    )


def _listing(directory: Path) -> list:
    return sorted((str(p.relative_to(directory)), p.is_dir()) for p in directory.rglob("*"))


def _raw_state(step_dir: Path) -> dict:
    """What Orbax reads back from a step folder without any target or check."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(step_dir.absolute() / "state")


def flip_array_bit(step_dir: Path) -> None:
    """Flips one bit in the middle of the largest Orbax data file of `step_dir` such that Orbax
    still reads the step back, without complaint, as a state with other values.

    The chunks are zstd frames without checksums, so most flips decode to other numbers; the
    few that break decoding (caught by TensorStore, not by the digest) are skipped."""
    before = jax.tree.leaves(_raw_state(step_dir))
    f = max(
        (p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    data = f.read_bytes()
    for at in range(len(data) // 2, len(data), 997):
        flipped = bytearray(data)
        flipped[at] ^= 0x10
        f.write_bytes(bytes(flipped))
        try:
            after = jax.tree.leaves(_raw_state(step_dir))
        except Exception:
            continue
        if any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True)):
            return
    f.write_bytes(data)
    raise AssertionError(f"no bit flip in {f} gave a silently different state")


# -- library -----------------------------------------------------------------------------------
def test_digest_depends_on_every_leaf_value_and_dtype():
    state = _state()
    digest = checkpointing.state_digest(state)
    assert checkpointing.state_digest(jax.tree.map(np.array, state)) == digest
    for i, leaf in enumerate(jax.tree.leaves(state)):
        bumped = np.array(leaf)
        bumped.reshape(-1)[-1] += 1
        leaves = list(jax.tree.leaves(state))
        leaves[i] = bumped
        other = jax.tree.unflatten(jax.tree.structure(state), leaves)
        assert checkpointing.state_digest(other) != digest, i
    same_bytes = {"a": np.zeros(4, np.float32)}
    assert checkpointing.state_digest(same_bytes) != checkpointing.state_digest(
        {"a": np.zeros(4, np.int32)}
    )


def test_flipped_bit_in_array_data_is_refused(tmp_path):
    state = _state()
    checkpointing.save(tmp_path / "ck", 1, state, {"model": "cnn"})
    flip_array_bit(tmp_path / "ck" / "1")
    listing = _listing(tmp_path / "ck")
    with pytest.raises(checkpointing.CheckpointCorruptError, match=r"ck/1 .*differ.*delete"):
        _restore(tmp_path / "ck", state)
    assert _listing(tmp_path / "ck") == listing


def test_checkpoint_without_digest_is_refused(tmp_path):
    state = _state()
    with ocp.CheckpointManager((tmp_path / "ck").absolute(), item_names=("state", "meta")) as m:
        m.save(
            1,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"model": "cnn"})
            ),
        )
        m.wait_until_finished()
    with pytest.raises(checkpointing.CheckpointMismatchError, match="no state digest"):
        _restore(tmp_path / "ck", state)


def _empty_step(ck: Path) -> Path:
    (ck / "3").mkdir()
    return ck / "3"


def _no_meta(ck: Path) -> Path:
    shutil.rmtree(ck / "1" / "meta")
    return ck / "1"


def _truncated_meta(ck: Path) -> Path:
    f = ck / "1" / "meta" / "metadata"
    f.write_bytes(f.read_bytes()[:20])
    return ck / "1"


def _garbled_meta(ck: Path) -> Path:
    (ck / "1" / "meta" / "metadata").write_bytes(b"\x00\xff not json")
    return ck / "1"


@pytest.mark.parametrize("damage", [_empty_step, _no_meta, _truncated_meta, _garbled_meta])
def test_damaged_step_folder_is_named(tmp_path, damage):
    state = _state()
    ck = tmp_path / "ck"
    checkpointing.save(ck, 1, state, {"model": "cnn"})
    step_dir = damage(ck)
    listing = _listing(ck)
    for call in (lambda: _restore(ck, state), lambda: checkpointing.read_meta(ck)):
        with pytest.raises(checkpointing.CheckpointCorruptError) as err:
            call()
        assert f"{step_dir.absolute()} " in str(err.value) and "delete" in str(err.value)
    assert _listing(ck) == listing
    if damage is _empty_step:  # Following the advice resumes from the step before.
        step_dir.rmdir()
        assert _restore(ck, state)[0] == 1


# -- the main job ------------------------------------------------------------------------------
def run_main(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.unlearn", "--no-progress", "--original-epochs", "1"]
        + ["--no-relearn", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished digits run with batch 32; tests work on copies of its workdir."""
    workdir = tmp_path_factory.mktemp("trained") / "wd"
    proc = run_main("--workdir", str(workdir), "--batch-size", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.fixture
def workdir(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "wd")
    return tmp_path / "wd"


def _original_dirs(workdir: Path) -> list[Path]:
    return sorted((workdir / "checkpoints" / "original").iterdir())


def _assert_refused(proc, workdir: Path, results: bytes, listing: list, *needles: str):
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    for needle in needles:
        assert needle in line, (needle, line)
    assert (workdir / "results.json").read_bytes() == results
    assert _listing(workdir) == listing


def test_main_job_refuses_a_flipped_bit(workdir):
    (original,) = _original_dirs(workdir)
    flip_array_bit(original / "1")
    results, listing = (workdir / "results.json").read_bytes(), _listing(workdir)
    proc = run_main("--workdir", str(workdir), "--batch-size", "32")
    _assert_refused(proc, workdir, results, listing, f"{original.absolute() / '1'} ", "delete")


def test_main_job_names_an_empty_step_folder(workdir):
    (original,) = _original_dirs(workdir)
    (original / "7").mkdir()
    results, listing = (workdir / "results.json").read_bytes(), _listing(workdir)
    proc = run_main("--workdir", str(workdir), "--batch-size", "32")
    _assert_refused(proc, workdir, results, listing, f"{original.absolute() / '7'} ", "delete")


def test_other_batch_size_trains_its_own_model(workdir):
    (first,) = _original_dirs(workdir)
    # (--overwrite: the work dir holds the batch-32 study's results)
    proc = run_main("--workdir", str(workdir), "--batch-size", "16", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["config"]["batch_size"] == 16
    assert results["phases"][0]["restored"] is False
    assert checkpointing.read_meta(first)["batch_size"] == 32
    (second,) = [d for d in _original_dirs(workdir) if d != first]
    assert checkpointing.read_meta(second)["batch_size"] == 16
    # A batch-32 model found where the batch-16 one belongs is refused, the setting named.
    shutil.rmtree(second)
    shutil.copytree(first, second)
    results, listing = (workdir / "results.json").read_bytes(), _listing(workdir)
    proc = run_main("--workdir", str(workdir), "--batch-size", "16")
    _assert_refused(proc, workdir, results, listing, "batch_size: checkpoint has 32, expected 16")
