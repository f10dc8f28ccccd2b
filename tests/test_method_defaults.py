"""Every method's defaults are what docs/methods.md says: for the MNIST CNN, the settings the
tuning chose (docs/tuning/*.json of dataset mnist, written by experiments/tune.py); the rest
their official values. Other datasets' defaults: tests/test_dataset_defaults.py."""

import json
from pathlib import Path

import pytest

from camu_jax import methods
from experiments import tune

ROOT = Path(__file__).resolve().parents[1]
# The class defaults are the MNIST CNN's: only MNIST records chose them.
RECORDS = sorted(
    path
    for path in (ROOT / "docs" / "tuning").glob("*.json")
    if json.loads(path.read_text()).get("dataset") == "mnist"
)


def tuned() -> dict[str, tuple[dict, int]]:
    """Per method: (the best setting over every record's rows, the records' original epochs).
    Refinement runs add rows to a method's search; the lowest score wins (first on ties)."""
    best: dict[str, tuple[float, dict, int]] = {}
    for path in RECORDS:
        record = json.loads(path.read_text())
        for row in record["rows"]:
            grid = record["grids"][row["method"]]
            setting = row.get("setting") or {k: row[k] for k in grid}  # older record layout
            name = row["method"]
            if name not in best or row["score"] < best[name][0]:
                best[name] = (row["score"], setting, record["original_epochs"])
    return {name: (setting, epochs) for name, (_, setting, epochs) in best.items()}


def test_every_method_but_camu_has_a_tuning_record():
    assert set(tuned()) == set(methods.names()) - {"camu"}


@pytest.mark.parametrize("name", [n for n in methods.names() if n != "camu"])
def test_defaults_are_the_tuned_settings(name):
    setting, epochs = tuned()[name]
    config = methods.get(name)
    want = tune.overrides(name, setting, epochs)
    if name == "unrolling":  # only eta * E / b matters: the default is rescaled to E = 20
        assert config.learning_rate * config.original_epochs == pytest.approx(
            want["learning_rate"] * want["original_epochs"]
        )
        return
    for field, value in want.items():
        assert getattr(config, field) == pytest.approx(value), (name, field)
