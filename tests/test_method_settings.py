"""Every method configurable from one config path: `--set METHOD.FIELD=VALUE` and study files
(`--config study.toml`, `experiments.configs.to_toml`).

* Parsing: every setting of every method reaches `ExperimentConfig.method_configs()` typed from
  its dataclass field; an unknown method, an unknown field or an untypable value exits 2 with
  one line listing the valid choices.
* What runs: for one method of each family (one-optimizer loss methods, teacher methods, CaMU,
  SSD, Unrolling, Boundary Expand), the config `--set` derives (through the command-line parse
  path) changes what `camu_jax.methods.run_population` computes: other parameters, or more
  steps for more epochs. The runs are tiny (96 random 8x8 images, an untrained CNN).
* Study files: `to_toml` -> `--config` gives the same config back, flags win over the file,
  unknown keys exit 2 naming key and file; the CLI writes `config.toml` into the work dir and
  `--config <work dir>/config.toml` reruns the study to the same metrics.
"""

import contextlib
import dataclasses
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_helpers import assert_one_line_error

from camu_jax import methods
from experiments.cli import config_from_args
from experiments.configs import ExperimentConfig, flat_values, setting_fields, to_toml
from experiments.unlearn import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def parse(*argv) -> ExperimentConfig:
    return config_from_args(build_parser().parse_args([str(a) for a in argv]))


def main_error(*argv):
    """`experiments.unlearn.main(argv)` in this process, as a finished process for
    `assert_one_line_error` (every case here fails before anything runs)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return types.SimpleNamespace(returncode=code, stderr=err.getvalue())


# -- parsing -----------------------------------------------------------------------------------


def _other(value):
    """A valid value != `value`, and its command-line text."""
    if isinstance(value, tuple):
        new = tuple(v + 1 for v in value)
        return new, ",".join(map(str, new))
    new = value + 1 if isinstance(value, int) else value * 0.5 + 0.125
    return new, repr(new)


@pytest.mark.parametrize("name", methods.names())
def test_every_setting_of_every_method_reaches_its_config(name):
    default = flat_values(parse("--methods", name).method_configs()[name])
    assert list(default) == list(setting_fields(name))
    for field, value in default.items():
        new, text = _other(value)
        got = flat_values(
            parse("--methods", name, "--set", f"{name}.{field}={text}").method_configs()[name]
        )
        assert got == {**default, field: new}, (name, field)
        assert type(got[field]) is type(value), (name, field)


def test_settings_are_a_hashable_value_holding_every_setting_used():
    config = parse("--methods", "ft,scrub", "--set", "ft.learning_rate=0.05")
    hash(config)
    assert ("ft", "learning_rate", 0.05) in config.method_settings
    assert {m for m, _, _ in config.method_settings} == {"ft", "scrub"}  # resolved, camu aside
    # The study's dataset (digits, the default) gives the defaults the settings apply over.
    assert config.method_configs()["ft"] == methods.get("ft", dataset="digits", learning_rate=0.05)
    assert config.method_configs()["scrub"] == methods.get("scrub", dataset="digits")
    # The library path: a config built by hand applies its settings the same way; later win.
    lib = ExperimentConfig(
        methods=("camu", "ft"),
        method_settings=(("ft", "epochs", 2), ("ft", "epochs", 3), ("camu", "rep_sample", 0.25)),
    )
    assert lib.method_configs()["ft"].epochs == 3
    assert lib.method_configs()["camu"].coefficients.rep_sample == 0.25
    lib.validate()


def test_camu_settings_are_flat_and_agree_with_the_camu_flags():
    config = parse("--set", "camu.rep_sample=0.25", "--set", "camu.epochs=3")
    assert config.camu.coefficients.rep_sample == 0.25 and config.camu.epochs == 3
    assert config == parse("--camu-rep-sample", "0.25", "--camu-epochs", "3")
    assert config.method_configs()["camu"] == config.camu
    # Both spellings of one setting: an error, not a silent precedence.
    proc = main_error("--set", "camu.epochs=3", "--camu-epochs", "4")
    assert_one_line_error(proc, "--set camu.epochs", "--camu-epochs", "give one")
    # Separate settings from the two spellings combine.
    assert parse("--set", "camu.epochs=3", "--camu-kl-lr", "0.5").camu.kl_lr == 0.5


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--set", "foo.epochs=1"), ("unknown method 'foo'", "camu, ft, ga", "unrolling")),
        (("--set", "ft.lr=0.05"), ("ft has no setting 'lr'", "learning_rate, momentum")),
        (("--set", "ft.epochs=2.5"), ("ft.epochs takes an integer", "'2.5'")),
        (("--set", "ft.learning_rate=fast"), ("ft.learning_rate takes a number", "'fast'")),
        (
            ("--methods", "scrub", "--set", "scrub.lr_decay_epochs=3,x"),
            ("comma-separated list of integers",),
        ),
        (("--set", "ft"), ("METHOD.FIELD=VALUE", "camu, ft")),
        (("--set", "ft.learning_rate"), ("METHOD.FIELD=VALUE",)),
        (
            ("--set", "camu.coefficients.rep_sample=0.1"),
            ("write camu.rep_sample", "its settings: epochs, kl_lr"),
        ),
        (("--set", "scrub.epochs=5"), ("scrub is not among the methods", "--methods")),
        # Typed but invalid: the method's own check names method and field.
        (("--methods", "ft", "--set", "ft.learning_rate=-1"), ("ft learning_rate", "-1.0")),
        (("--methods", "ft", "--set", "ft.learning_rate=nan"), ("ft learning_rate", "nan")),
        (("--set", "camu.kl_lr=inf"), ("CaMU kl_lr", "inf")),
        (("--methods", "scrub", "--set", "scrub.epochs=0"), ("scrub epochs", "got 0")),
    ],
)
def test_bad_settings_exit_2_with_one_line(args, needles):
    assert_one_line_error(main_error(*args), *needles)


def test_the_real_command_line_refuses_an_unknown_field():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.unlearn", "--set", "scrub.epoch=5"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert_one_line_error(proc, "scrub has no setting 'epoch'", "epochs, msteps")


# -- what runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_unlearning):
    """The seed-0 run of `tiny_unlearning` (tests/conftest.py)."""
    t = tiny_unlearning
    return dict(model=t["model"], data=t["data"], original=t["originals"][0], splits=t["splits"][0])


def run(tiny, method):
    ((variables, info),) = methods.run_population(
        method,
        tiny["model"],
        [tiny["original"]],
        data=tiny["data"],
        splits=[tiny["splits"]],
        seeds=[0],
        num_classes=10,
        progress=False,
    )
    assert variables is not None and "diverged" not in info, info
    leaves = jax.tree.leaves(variables)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    return leaves, info


FAMILIES = {
    # family: (method, its --set, what must change)
    "one-optimizer loss methods": ("ft", "ft.learning_rate=0.05", "params"),
    "teacher methods": ("scrub", "scrub.epochs=7", "steps"),
    "camu": ("camu", "camu.rep_sample=0.1", "params"),
    "ssd": ("ssd", "ssd.lam=0.5", "params"),
    "unrolling": ("unrolling", "unrolling.learning_rate=0.01", "params"),
    "boundary_expand": ("boundary_expand", "boundary_expand.learning_rate=0.003", "params"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_setting_changes_what_runs(tiny, family):
    name, setting, changes = FAMILIES[family]
    default = parse("--methods", name).method_configs()[name]
    changed = parse("--methods", name, "--set", setting).method_configs()[name]
    field, value = setting.split("=")[0].split(".")[1], float(setting.split("=")[1])
    assert flat_values(changed)[field] == value != flat_values(default)[field]
    (a, info_a), (b, info_b) = run(tiny, default), run(tiny, changed)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True)), family
    if changes == "steps":  # more epochs of the same plans: more steps
        assert info_b["steps"] > info_a["steps"], (info_a["steps"], info_b["steps"])


# -- study files -------------------------------------------------------------------------------


STUDY = (
    "--methods",
    "camu,ft,scrub,ssd",
    "--set",
    "ft.learning_rate=0.05",
    "--set",
    "scrub.lr_decay_epochs=1,2",
    "--set",
    "ssd.alpha=0.30000000000000004",  # 0.1 + 0.2: a float repr must carry exactly
    "--camu-rep-forget",
    "0.375",
    "--forget-class",
    "all",
    "--seeds",
    "3,4",
    "--population-size",
    "2",
    "--original-epochs",
    "1",
    "--no-relearn",
    "--workdir",
    'some dir/with "quotes"',
)


def write(tmp_path, text, name="study.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_study_file_round_trips_exactly(tmp_path):
    config = parse(*STUDY)
    assert config.forget_classes == tuple((c,) for c in range(10)) and config.data_dir is None
    assert parse("--config", write(tmp_path, to_toml(config))) == config
    for args in (
        (),
        ("--scenario", "random", "--forget-fraction", "0.125", "--methods", "all"),
        ("--scenario", "proportions", "--forget-proportions", "0.1,0.2"),
        ("--dataset", "mnist", "--data-dir", str(tmp_path), "--eval-workers", "1"),
    ):
        config = parse(*args)
        assert parse("--config", write(tmp_path, to_toml(config))) == config, args
    # Fully resolved: a method's defaults are in the file, so the file alone says what ran.
    text = to_toml(parse("--methods", "ft"))
    ft = methods.get("ft", dataset="digits")
    assert (
        f"[method_settings.ft]\nepochs = {ft.epochs}\nlearning_rate = {ft.learning_rate!r}\n"
        in text
    )
    assert "[method_settings.camu]" in text  # CaMU's resolved preset is always recorded


def test_flags_override_the_file(tmp_path):
    config = parse(*STUDY)
    path = write(tmp_path, to_toml(config))
    over = parse(
        "--config",
        path,
        "--seeds",
        "5",
        "--set",
        "ft.learning_rate=0.07",
        "--camu-epochs",
        "9",
        "--set",
        "camu.rep_forget=0.5",
    )
    assert over == dataclasses.replace(
        config,
        seeds=(5,),
        camu=dataclasses.replace(
            config.camu,
            epochs=9,
            coefficients=dataclasses.replace(config.camu.coefficients, rep_forget=0.5),
        ),
        method_settings=tuple(
            (m, f, 0.07 if (m, f) == ("ft", "learning_rate") else v)
            for m, f, v in config.method_settings
        ),
    )
    # Fewer --methods than the file's: the file's other tables are left out, not an error.
    fewer = parse("--config", path, "--methods", "ft")
    assert fewer.method_configs() == {"ft": config.method_configs()["ft"]}
    # A partial file is a study too: what it leaves out is derived as for the flags.
    partial = write(tmp_path, 'dataset = "mnist"\n\n[method_settings.ft]\nepochs = 2\n', "p.toml")
    config = parse("--config", partial, "--methods", "ft")
    assert config.model == "cnn" and config.workdir.startswith("runs/mnist-class0-")
    assert config.method_configs()["ft"] == methods.get("ft", epochs=2)


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("datset = 'mnist'\n", ("unknown key 'datset'", "keys: dataset, model")),
        ("camu = 1\n", ("key 'camu'", "[method_settings.camu]")),
        ("seeds = 3\n", ("seeds takes a list of integers", "got 3")),
        ("relearn = 'no'\n", ("relearn takes a boolean",)),
        ("[method_settings.fft]\nepochs = 1\n", ("unknown method 'fft'", "camu, ft")),
        ("[method_settings.ft]\nlr = 1.0\n", ("ft has no setting 'lr'", "learning_rate")),
        ("[method_settings.ft]\nepochs = 1.5\n", ("ft.epochs takes an integer", "1.5")),
        ("[method_settings.camu.coefficients]\nrep_sample = 1.0\n", ("write camu.rep_sample",)),
        ("method_settings = 1\n", ("one table per method",)),
        ("dataset = \n", ("not valid TOML",)),
    ],
)
def test_bad_study_files_exit_2_naming_key_and_file(tmp_path, text, needles):
    path = write(tmp_path, text)
    assert_one_line_error(main_error("--config", path), str(path), *needles)


def test_a_missing_study_file_exits_2(tmp_path):
    assert_one_line_error(main_error("--config", tmp_path / "nope.toml"), "nope.toml", "no such")


# -- end to end --------------------------------------------------------------------------------


def run_main(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.unlearn", "--no-progress", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1200,
    )


def _metrics(workdir):
    runs = json.loads((workdir / "results.json").read_text())["runs"]
    return [
        {
            m: {k: v for k, v in r.items() if "seconds" not in k and not k.startswith("rte")}
            for m, r in run["methods"].items()
        }
        for run in runs
    ]


def test_recorded_study_reruns_to_the_same_metrics(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--original-epochs", "1", "--no-relearn", "--eval-workers", "1")
    settings = ("--methods", "ft", "--set", "ft.learning_rate=0.05", "--set", "ft.epochs=2")
    proc = run_main("--workdir", a, *common, *settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((a / "results.json").read_text())
    assert results["method_configs"]["ft"] == {
        **dataclasses.asdict(methods.get("ft", dataset="digits")),
        "learning_rate": 0.05,
        "epochs": 2,
    }
    recorded = (a / "config.toml").read_text()
    assert "[method_settings.ft]\nepochs = 2\nlearning_rate = 0.05\n" in recorded
    proc = run_main("--config", a / "config.toml", "--workdir", b)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        json.loads((b / "results.json").read_text())["method_configs"]
        == (results["method_configs"])
    )
    assert _metrics(b) == _metrics(a)
    # The second study's record differs from the first's in its work dir alone.
    assert (b / "config.toml").read_text() == recorded.replace(
        f'workdir = "{a}"', f'workdir = "{b}"'
    )


def test_the_readme_study_file_is_a_study(tmp_path):
    import re

    (block,) = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    config = parse("--config", write(tmp_path, block))
    assert config.dataset == "mnist" and config.methods == ("camu", "ft")
    assert config.method_configs()["ft"].learning_rate == 0.05
    assert config.camu.coefficients.rep_sample == 0.4


def test_a_tuple_setting_is_checked_entry_by_entry():
    with pytest.raises(ValueError, match="lr_decay_epochs must be a positive integer, got -1"):
        methods.get("scrub", lr_decay_epochs=(3, -1)).validate()
