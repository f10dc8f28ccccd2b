"""experiments.tune: the protocol's pieces, and one tiny tuning run end to end on digits."""

import json

import numpy as np

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


def test_tiny_tuning_run(tmp_path):
    out = tmp_path / "t.json"
    grid = json.dumps({"ga": {"learning_rate": [1e-4, 1e-2], "epochs": [1]}})
    args = ["--dataset", "digits", "--original-epochs", "1", "--cache", str(tmp_path / "c")]
    assert tune.main([*args, "--out", str(out), "--grid", grid, "ga"]) == 0
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
