"""Compilation ahead (`run_study(compile_ahead=True)`): every method phase's programs compile
in a background thread from the study's start, on stand-ins of the originals, so a method
phase compiles nothing when it starts, and computes what it computes without it.

Run on a CPU with scanned chunks (`use_scan=True`, the accelerators' mode), where the layout
is chosen without timing, as on an accelerator.
"""

import jax
import pytest

from camu_jax import methods
from camu_jax.data import load_dataset
from camu_jax.data.pipeline import DeviceData, input_spec_for
from camu_jax.data.splits import ForgetSpec, make_splits
from camu_jax.models import create_model
from camu_jax.results import TIME_KEYS
from camu_jax.study import Run, run_study
from camu_jax.training import TrainConfig

TIMES = TIME_KEYS  # every time key of a model's entry (wall clock)


@pytest.fixture(scope="module")
def study():
    d = load_dataset("digits", progress=False)
    spec = input_spec_for("digits", "cnn")
    train = DeviceData.put(d.train_images, d.train_labels, spec=spec)
    test = DeviceData.put(d.test_images, d.test_labels, spec=spec)
    runs = [
        Run(
            s,
            make_splits(d.train_labels, ForgetSpec(classes=(c,)), seed=s, num_classes=10),
            (c,),
        )
        for s, c in ((0, 0), (1, 3))
    ]

    def run(ahead: bool) -> dict:
        return run_study(
            create_model("cnn", num_classes=10),
            train=train,
            test=test,
            runs=runs,
            methods=[methods.get("camu"), methods.get("ft", epochs=1)],
            train_config=TrainConfig(epochs=1),
            num_classes=10,
            eval_workers=1,
            progress=False,
            log=None,
            compile_ahead=ahead,
            use_scan=True,
        )

    return run


def test_method_phases_compile_nothing_when_compiled_ahead(study):
    jax.clear_caches()
    ahead = study(True)
    for name in ("camu", "ft"):
        (phase,) = [p for p in ahead["phases"] if p["phase"] == name]
        assert phase["compiled_ahead"]["programs_compiled"] > 0, phase
        assert phase["programs"]["compiled"] == {}, phase
        # Its models' compile seconds count what was compiled for them ahead, split equally.
        members = [run["methods"][name] for run in ahead["runs"]]
        share = phase["compiled_ahead"]["compile_seconds"] / len(members)
        for m in members:
            assert m["compile_seconds"] >= share > 0, (name, m, share)
            assert m["seconds"] == pytest.approx(m["compile_seconds"] + m["run_seconds"])
    # The same numbers as without it (the same programs).
    jax.clear_caches()
    plain = study(False)
    assert all("compiled_ahead" not in p for p in plain["phases"])
    (camu,) = [p for p in plain["phases"] if p["phase"] == "camu"]
    assert camu["programs_compiled"] > 0  # compiled by the phase itself this time

    def figures(record):
        return [
            {m: {k: v for k, v in r.items() if k not in TIMES} for m, r in run["methods"].items()}
            for run in record["runs"]
        ]

    assert figures(ahead) == figures(plain)
