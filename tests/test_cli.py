"""The command line derived from the config dataclasses: every field is a flag, flags reach the
config (and beat the preset), forget-index files are read strictly."""

import dataclasses
import re
import typing

import numpy as np
import pytest

from camu_jax.methods.camu import CamuCoefficients, CamuConfig, camu_preset
from experiments.cli import add_config_arguments, config_from_args, load_indices
from experiments.configs import ExperimentConfig
from experiments.unlearn import build_parser


def parse(*argv):
    return config_from_args(build_parser().parse_args(list(argv)))


def leaf_paths(cls, prefix=""):
    """Dotted paths of every non-dataclass field, nested configs included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(hint) or inner:
            yield from leaf_paths(inner[0] if inner else hint, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def get(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def test_every_config_field_is_a_flag():
    dests = {a.dest for a in build_parser()._actions}
    paths = list(leaf_paths(ExperimentConfig))
    assert "camu.coefficients.out_forget" in paths and "camu.batch_size" in paths
    assert {f"config.{p}" for p in paths} <= dests
    # Every method's settings: one repeatable flag, and a study file beside the flags.
    flags = {o: a.dest for a in build_parser()._actions for o in a.option_strings}
    assert flags["--set"] == "config.method_settings" and flags["--config"] == "study_file"


CAMU_FLAGS = {
    "epochs": "--camu-epochs",
    "kl_lr": "--camu-kl-lr",
    "impair_lr": "--camu-impair-lr",
    "batch_size": "--camu-batch-size",
    "weight_decay": "--camu-weight-decay",
    "coefficients.rep_sample": "--camu-rep-sample",
    "coefficients.rep_forget": "--camu-rep-forget",
    "coefficients.out_sample": "--camu-out-sample",
    "coefficients.out_forget": "--camu-out-forget",
}


def test_every_camu_setting_reaches_the_config():
    assert set(CAMU_FLAGS) == set(leaf_paths(CamuConfig))
    preset = parse().camu
    for path, flag in CAMU_FLAGS.items():
        old = get(preset, path)
        new = old * 2 + 1 if isinstance(old, int) else old * 3 + 0.125  # != old, valid
        camu = parse(flag, str(new)).camu
        assert get(camu, path) == new, flag
        # `--set camu.<field>` is the same setting, CaMU's coefficients flat.
        assert parse("--set", f"camu.{path.split('.')[-1]}={new}").camu == camu, path
        for other in CAMU_FLAGS:  # and nothing else moved away from the preset
            assert other == path or get(camu, other) == get(preset, other), (flag, other)


def test_explicit_flag_wins_over_the_preset():
    preset = camu_preset("digits", "random")
    assert preset.epochs != CamuConfig().epochs  # else the test below proves nothing
    assert parse("--scenario", "random").camu == preset
    # The explicit value equals the class preset's default, and still wins.
    assert parse("--scenario", "random", "--camu-epochs", "2").camu.epochs == 2
    assert parse("--scenario", "random", "--kl-lr", "0.5").camu.kl_lr == 0.5  # older spelling
    assert parse("--impair-lr", "0.25").camu.impair_lr == 0.25


def test_batch_size_reaches_every_phase_unless_camu_sets_its_own():
    config = parse("--batch-size", "33")
    assert config.batch_size == 33 and config.camu.batch_size == 33
    config = parse("--batch-size", "33", "--camu-batch-size", "12")
    assert config.batch_size == 33 and config.camu.batch_size == 12
    # The library path agrees: no `camu` means the preset with the run's batch.
    assert ExperimentConfig(batch_size=48).camu_config().batch_size == 48


def test_other_settings_reach_the_config(tmp_path):
    config = parse(
        "--seeds",
        "0,1,2",
        "--forget-class",
        "0,1",
        "--learning-rate",
        "0.002",
        "--weight-decay",
        "0",
        "--relearn-every",
        "7",
        "--no-relearn",
        "--no-progress",
        "--checkpoint-dir",
        str(tmp_path),
    )
    assert config.seeds == (0, 1, 2) and config.forget_classes == ((0, 1),)
    assert (config.learning_rate, config.weight_decay, config.relearn_every) == (0.002, 0.0, 7)
    assert not config.relearn and not config.progress
    assert config.checkpoint_dir == str(tmp_path)
    # The default work dir is named after the settings (tests/test_output_paths.py).
    assert re.fullmatch(r"runs/digits-class0\+1-[0-9a-f]{8}", config.workdir), config.workdir
    assert config.model == "cnn"
    assert parse("--forget-class", "all").forget_classes == tuple((c,) for c in range(10))


def test_a_new_config_field_becomes_a_flag_without_copying():
    @dataclasses.dataclass(frozen=True)
    class Inner:
        population: int = 4

    @dataclasses.dataclass(frozen=True)
    class Outer:
        methods: tuple[str, ...] = ("camu",)
        verbose: bool = False
        search: Inner | None = None

    import argparse

    p = argparse.ArgumentParser()
    add_config_arguments(p, Outer)
    args = vars(
        p.parse_args(["--methods", "camu,retrain", "--verbose", "--search-population", "8"])
    )
    assert args == {
        "config.methods": ("camu", "retrain"),
        "config.verbose": True,
        "config.search.population": 8,
    }

    @dataclasses.dataclass(frozen=True)
    class Unsupported:
        table: dict[str, int] = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="table"):
        add_config_arguments(argparse.ArgumentParser(), Unsupported)


def test_camu_coefficients_default_is_the_reference():
    assert CamuConfig().coefficients == CamuCoefficients(0.5, 0.5, 0.9, 0.01)


# -- forget-index files -------------------------------------------------------------------------


def test_load_indices_accepts_1d_integers(tmp_path):
    np.save(tmp_path / "a.npy", np.array([3, 1, 2], np.int32))
    (tmp_path / "b.txt").write_text("3\n1\n2\n")
    assert load_indices(tmp_path / "a.npy") == (3, 1, 2)
    assert load_indices(tmp_path / "b.txt") == (3, 1, 2)


@pytest.mark.parametrize(
    ("name", "array", "needle"),
    [
        ("float.npy", np.arange(40) + 0.5, "float64"),
        ("integral_float.npy", np.arange(40, dtype=np.float32), "float32"),  # still not indices
        ("bool.npy", np.ones(4, bool), "bool"),
        ("matrix.npy", np.arange(40).reshape(4, 10), "(4, 10)"),
        ("matrix.txt", "1 2\n3 4\n", "(2, 2)"),
        ("halves.txt", "1\n2.5\n", "2.5"),
        ("words.txt", "1\nseven\n", "seven"),
    ],
)
def test_load_indices_refuses_what_would_forget_the_wrong_items(tmp_path, name, array, needle):
    path = tmp_path / name
    if isinstance(array, str):
        path.write_text(array)
    else:
        np.save(path, array)
    with pytest.raises(ValueError) as e:
        load_indices(path)
    assert str(path) in str(e.value) and needle in str(e.value)
