"""Sweeps as populations: a comma list on a numeric setting (`--set ft.learning_rate=0.01,0.05`;
several give their product) runs every point on every run, one row per point.

A point of a sweep is the run of its settings: with `population_size=1` every member runs
alone on the program a single config runs on (settings are data), so a point's figures equal
those of a study of that one config, exactly.
"""

import dataclasses

import pytest

from camu_jax import methods
from camu_jax.results import TIME_KEYS
from camu_jax.study import folder_name, point_labels
from experiments.cli import config_from_args
from experiments.configs import ExperimentConfig, read_study, to_toml
from experiments.unlearn import build_parser

TIMES = TIME_KEYS  # every time key of a model's entry (wall clock)


def _config(*flags: str) -> ExperimentConfig:
    return config_from_args(build_parser().parse_args(list(flags)))


def test_comma_lists_give_the_product_of_their_points_one_row_each():
    config = _config(
        "--methods", "camu,ft", "--set", "ft.learning_rate=0.01,0.03",
        "--set", "ft.momentum=0.5,0.9", "--set", "camu.kl_lr=1e-4,3e-4",
    )  # fmt: skip
    groups = config.method_groups()
    assert [c.kl_lr for c in groups["camu"]] == [1e-4, 3e-4]
    assert [(c.learning_rate, c.momentum) for c in groups["ft"]] == [
        (0.01, 0.5),
        (0.01, 0.9),
        (0.03, 0.5),
        (0.03, 0.9),
    ]
    assert list(config.method_configs()) == [
        "camu[kl_lr=0.0001]",
        "camu[kl_lr=0.0003]",
        "ft[learning_rate=0.01,momentum=0.5]",
        "ft[learning_rate=0.01,momentum=0.9]",
        "ft[learning_rate=0.03,momentum=0.5]",
        "ft[learning_rate=0.03,momentum=0.9]",
    ]
    # The points differ in nothing else.
    assert {c.epochs for c in groups["ft"]} == {methods.get("ft", dataset="digits").epochs}
    assert (
        folder_name("ft[learning_rate=0.01,momentum=0.5]") == "ft@learning_rate=0.01+momentum=0.5"
    )


def test_a_sweep_survives_the_study_file(tmp_path):
    config = _config("--methods", "ft", "--set", "ft.learning_rate=0.01,0.03")
    path = tmp_path / "study.toml"
    path.write_text(to_toml(config))
    assert "learning_rate = [0.01, 0.03]" in path.read_text()
    fields, settings = read_study(path)
    assert settings["ft"]["learning_rate"] == (0.01, 0.03)
    again = _config("--config", str(path))
    assert again.method_configs() == config.method_configs()


def test_a_sweep_of_one_value_is_no_sweep_and_a_tuple_field_is_no_sweep():
    config = _config("--methods", "ft", "--set", "ft.learning_rate=0.05,")
    assert list(config.method_configs()) == ["ft"]
    assert config.method_configs()["ft"].learning_rate == 0.05
    scrub = _config("--methods", "scrub", "--set", "scrub.lr_decay_epochs=3,5")
    assert list(scrub.method_configs()) == ["scrub"]


def test_repeated_points_are_refused():
    with pytest.raises(ValueError, match="same settings twice"):
        point_labels([methods.get("ft"), methods.get("ft")])


@pytest.mark.parametrize("name, field, values", [("ft", "learning_rate", (0.01, 0.05))])
def test_a_point_of_a_sweep_is_the_study_of_its_one_config(name, field, values):
    import camu_jax
    from camu_jax.data import load_dataset
    from camu_jax.data.pipeline import DeviceData, input_spec_for
    from camu_jax.models import create_model

    d = load_dataset("digits", progress=False)
    spec = input_spec_for("digits", "cnn")
    train = DeviceData.put(d.train_images, d.train_labels, spec=spec)
    test = DeviceData.put(d.test_images, d.test_labels, spec=spec)
    splits = camu_jax.make_splits(
        d.train_labels, camu_jax.ForgetSpec(kind="class", classes=(0,)), seed=0, num_classes=10
    )
    kw = dict(
        train=train,
        test=test,
        splits=[splits],
        seeds=[0],
        train_config=camu_jax.TrainConfig(epochs=1),
        population_size=1,
        eval_workers=1,
    )
    model = create_model("cnn", num_classes=10)
    base = methods.get(name, epochs=1)
    points = [dataclasses.replace(base, **{field: v}) for v in values]
    swept = camu_jax.compare(model, methods=[points], record=True, **kw)
    labels = [f"{name}[{field}={v!r}]" for v in values]
    assert list(swept["method_configs"]) == labels
    (phase,) = [p for p in swept["phases"] if p["phase"] == name]
    assert phase["members"] == len(values) and phase["points"] == len(values)
    rows = swept["runs"][0]["methods"]
    assert rows[labels[0]]["RA"] != rows[labels[1]]["RA"]
    alone = camu_jax.compare(model, methods=[points[1]], **kw)[0]["methods"][name]
    assert {k: v for k, v in rows[labels[1]].items() if k not in TIMES} == {
        k: v for k, v in alone.items() if k not in TIMES
    }
