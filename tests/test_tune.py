"""experiments.tune: the protocol's pieces, and one tiny tuning run end to end on digits."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from camu_jax.data.splits import Splits
from experiments import tune


def test_validation_split_is_held_out_of_remain_and_seeded():
    forget = np.arange(0, 100)
    remain = np.arange(100, 1100)
    splits, val = tune.split_validation(Splits(forget=forget, remain=remain, sample=forget), 0)
    assert val.size == 100 and np.isin(val, remain).all()
    assert not np.isin(val, splits.remain).any() and not np.isin(val, splits.sample).any()
    assert np.array_equal(np.union1d(splits.remain, val), remain)
    again, val2 = tune.split_validation(Splits(forget=forget, remain=remain, sample=forget), 0)
    assert np.array_equal(val, val2) and np.array_equal(splits.sample, again.sample)


def test_grid_settings_and_overrides():
    assert tune.settings({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    assert tune.overrides("unsir", {"lr_scale": 0.1, "repair_epochs": 3}, 5) == {
        "impair_lr": 0.002,
        "repair_lr": 0.001,
        "repair_epochs": 3,
    }
    assert tune.overrides("unrolling", {"learning_rate": 1e-3}, 5)["original_epochs"] == 5
    for name in tune.GRIDS:  # every grid setting is a valid config of its method
        from camu_jax import methods

        for setting in tune.settings(tune.GRIDS[name]):
            if name != "ssd":
                methods.get(name, **tune.overrides(name, setting, 5)).validate()


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert tune.main(["--out", str(tmp_path / "x.json"), "nope"]) == 2
    assert "no grid for ['nope']" in capsys.readouterr().err
    assert tune.main(["--out", str(tmp_path / "x.json"), "--grid", "{bad", "ga"]) == 2
    assert not (tmp_path / "x.json").exists()


class _WritesMarker:
    """Unpickled by a plain `pickle.loads`, creates a marker file: code run from a cache."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_tiny_tuning_run(tmp_path):
    out = tmp_path / "t.json"
    grid = json.dumps({"ga": {"learning_rate": [1e-4, 1e-2], "epochs": [1]}})
    args = ["--dataset", "digits", "--original-epochs", "1", "--cache", str(tmp_path / "c")]
    # Issue 15 item 1: a planted pickle where the cache used to live is never loaded.
    marker = tmp_path / "code-ran"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "digits_c0_s0_e1.pkl").write_bytes(pickle.dumps(_WritesMarker(marker)))
    assert tune.main([*args, "--out", str(out), "--grid", grid, "ga"]) == 0
    assert not marker.exists()
    with np.load(tmp_path / "c" / "digits_c0_s0_e1.npz", allow_pickle=False) as cached:
        assert any(k.startswith("original/params/") for k in cached.files)
        assert any(k.startswith("retrain/params/") for k in cached.files)
    r = json.loads(out.read_text())
    target = r["reference"]["retrain"]
    rows = [row for row in r["rows"] if row["method"] == "ga"]
    assert [row["setting"]["learning_rate"] for row in rows] == [1e-4, 1e-2]
    for row in rows:
        if "diverged" not in row:
            want = abs(row["acc_forget"] - target["acc_forget"]) + abs(
                row["acc_val"] - target["acc_val"]
            )
            assert abs(row["score"] - want) < 1e-9
    assert r["chosen"]["ga"]["score"] == min(row["score"] for row in rows)
    assert r["sizes"]["val"] > 0 and r["sizes"]["forget"] > 0


def test_default_cache_is_the_users_not_a_fixed_tmp_path():
    assert tune.DEFAULT_CACHE == os.path.join("~", ".cache", "camu_jax", "tune")


def test_cache_round_trip_and_what_it_refuses(tmp_path):
    like = {"params": {"w": np.zeros((2, 3), np.float32)}, "batch_stats": {"m": np.zeros(3)}}
    trees = {
        "original": {
            "params": {"w": np.ones((2, 3), np.float32)},
            "batch_stats": {"m": np.ones(3)},
        },
        "retrain": like,
    }
    path = tmp_path / "c" / "x.npz"
    tune.save_cache(path, trees)
    got = tune.load_cache(path, {"original": like, "retrain": like})
    np.testing.assert_array_equal(got["original"]["params"]["w"], np.ones((2, 3)))
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.npz"]  # no temp file left
    # Another model's shapes, a file holding a pickle, object arrays: refused, naming the file.
    other = {"params": {"w": np.zeros((4, 3), np.float32)}, "batch_stats": {"m": np.zeros(3)}}
    with pytest.raises(ValueError, match=r"x\.npz: original/params/w is float32\[2, 3\]"):
        tune.load_cache(path, {"original": other, "retrain": like})
    marker = tmp_path / "code-ran"
    path.write_bytes(pickle.dumps(_WritesMarker(marker)))
    with pytest.raises(ValueError, match="not a readable .npz"):
        tune.load_cache(path, {"original": like, "retrain": like})
    np.savez(path, **{"original/params/w": np.array([_WritesMarker(marker)], dtype=object)})
    with pytest.raises(ValueError, match="not a readable .npz|x.npz"):
        tune.load_cache(path, {"original": like, "retrain": like})
    assert not marker.exists()


def test_digits_has_its_own_grids_and_each_setting_is_a_config():
    from camu_jax import methods

    assert tune.grids_for("digits") is tune.DIGITS_GRIDS
    assert tune.grids_for("mnist") is tune.GRIDS and tune.grids_for("cifar10") is tune.GRIDS
    assert set(tune.DIGITS_GRIDS) == set(tune.GRIDS)
    for name, grid in tune.DIGITS_GRIDS.items():
        if name != "ssd":
            for setting in tune.settings(grid):
                methods.get(name, dataset="digits", **tune.overrides(name, setting, 20)).validate()


def test_seed_lists():
    assert tune.seed_list("0") == [0] and tune.seed_list("0,1,2") == [0, 1, 2]
    for bad in ("0,0", "-1", "a"):
        with pytest.raises(Exception, match="seeds"):
            tune.seed_list(bad)


def test_several_seeds_score_the_mean_of_each_seeds_score(tmp_path):
    out = tmp_path / "t.json"
    grid = json.dumps(
        {
            "ga": {"learning_rate": [1e-4, 1e-2], "epochs": [1]},
            "ssd": {"alpha": [1.0], "lam": [1.0]},
        }
    )
    args = ["--dataset", "digits", "--original-epochs", "1", "--cache", str(tmp_path / "c")]
    assert tune.main([*args, "--seed", "0,1", "--out", str(out), "--grid", grid, "ga", "ssd"]) == 0
    r = json.loads(out.read_text())
    assert r["seeds"] == [0, 1] and [x["seed"] for x in r["references"]] == [0, 1]
    for row in r["rows"]:
        if "diverged" in row:
            continue
        assert [s["seed"] for s in row["seeds"]] == [0, 1]
        for s, ref in zip(row["seeds"], r["references"], strict=True):
            target = ref["retrain"]
            want = abs(s["acc_forget"] - target["acc_forget"]) + abs(
                s["acc_val"] - target["acc_val"]
            )
            assert abs(s["score"] - want) < 1e-9
        assert abs(row["score"] - np.mean([s["score"] for s in row["seeds"]])) < 1e-9
        assert abs(row["acc_forget"] - np.mean([s["acc_forget"] for s in row["seeds"]])) < 1e-9
    assert "end_to_end" in r["chosen"]["ssd"] and len(r["chosen"]["ssd"]["selected"]) == 2
