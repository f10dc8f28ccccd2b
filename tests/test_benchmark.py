"""The benchmark's machinery on tiny inputs: the JSON layout, and that every side really runs.

Timings themselves are never asserted (the machine is shared); `python -m experiments.benchmark`
produces them. Needs torch, like the parity tests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from experiments.benchmark import cli, data, end_to_end, evaluation, steps, study, table  # noqa: E402


@pytest.fixture(scope="module")
def tiny_data():
    rng = np.random.default_rng(0)
    n, n_test = 640, 96
    labels = np.concatenate([np.zeros(64, np.int32), rng.integers(1, 10, n - 64).astype(np.int32)])
    return {
        "train_images": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
        "train_labels": rng.permutation(labels).astype(np.int32),
        "test_images": rng.integers(0, 256, (n_test, 28, 28, 1), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test).astype(np.int32),
        "data": "synthetic",
    }


def _positive(*xs):
    return all(np.isfinite(x) and x > 0 for x in xs)


def test_step_benchmark_reports_both_sides():
    r = steps.bench_step("cnn", data.MNIST_SHAPE, 4, steps=2, repeats=2, warmup=1, teacher=True)
    assert _positive(r["jax_steps_per_s"], r["torch_steps_per_s"], r["jax_teacher_steps_per_s"])
    assert r["speedup"] == pytest.approx(r["jax_steps_per_s"] / r["torch_steps_per_s"])
    assert len(r["pair_speedups"]) == 2 and r["jax_compile_s"] > 0


def test_end_to_end_and_eval_on_tiny_data(tiny_data):
    variables, state_dict = data.original_weights()
    e2e = end_to_end.bench_end_to_end(
        tiny_data,
        variables,
        state_dict,
        repeats={"mnist_class": 1, "mnist_random": 1},
        quick=True,
    )
    cls = e2e["mnist_class"]
    assert cls["forget"] == 64 and cls["epochs"] == 2 and cls["steps"] == 4
    assert e2e["mnist_random"]["forget"] == 64 and e2e["mnist_random"]["epochs"] == 1
    for r in e2e.values():
        # Every JAX run starts from empty caches (the second preset's too): compilation is
        # inside jax_s.
        assert _positive(r["jax_s"], r["torch_s"], r["jax_compile_s"])
        assert r["jax_compile_s"] < r["jax_s"]
        assert r["speedup"] == pytest.approx(r["torch_s"] / r["jax_s"])
    ev = evaluation.bench_eval(tiny_data, variables, state_dict, repeats=1)
    assert ev["examples"] == 96 and _positive(ev["jax_s"], ev["torch_s"])
    # Same weights on both sides: the same predictions. An argmax could differ only where the
    # two largest logits lie within the sides' float32 difference (depth u sqrt(fan_in) max|y|
    # ~ 5 * 6e-8 * 40 * 0.12 ~ 1e-6, as in tests/test_parity.py); on these fixed inputs the
    # smallest such gap is 8e-3. Compared as counts of correct predictions.
    assert round(ev["accuracy_jax"] * 96) == round(ev["accuracy_torch"] * 96)


def _study_section():
    measures = {k: 1.0 for k in study.MEASURES}
    return {
        "dataset": "digits",
        "scenario": "class",
        "seeds": [0, 1],
        "counts": {"originals": 2, "retrains": 20, "camu": 20, "evaluations": 60},
        "repeats": 1,
        "population": {**measures, "relearning_s": None},
        "sequential": {**measures, "wall_s": 4.0, "relearning_s": None},
        "population_over_sequential": {**measures, "wall_s": 0.25, "relearning_s": None},
    }


def test_table(capsys):
    step = {"jax_steps_per_s": 2.0, "torch_steps_per_s": 1.0, "speedup": 2.0}
    e2e = {
        "jax_s": 1.0,
        "torch_s": 3.0,
        "speedup": 3.0,
        "jax_compile_s": 0.5,
        "jax_excl_compile_s": 0.5,
        "speedup_excl_compile": 6.0,
        "epochs": 2,
    }
    results = {
        "step": {"cnn_b32": step},
        "end_to_end": {"mnist_class": e2e, "mnist_random": e2e},
        "study": _study_section(),
        "device": {
            "jax_device": "cpu:cpu",
            "jax_device_count": 1,
            "torch_device": "cpu",
            "torch_device_name": "x",
            "torch_threads": 2,
        },
        "data": "synthetic",
    }
    table.print_table(results)
    out = capsys.readouterr().out
    assert "step.cnn_b32" in out and "2.00x" in out and "3.00x" in out
    assert "study: digits, class removal, seeds 0,1: 20 runs" in out and "0.25x" in out


def test_main_writes_the_json(tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["--out", str(out), "--quick", "--only", "eval"]) == 0
    results = json.loads(out.read_text())
    assert {"device", "versions", "eval", "quick"} <= set(results)
    assert results["versions"]["jax"] and results["device"]["jax_device_count"] >= 1
    assert results["eval"]["examples"] == data.MNIST_TEST


def test_wgrad_chunking_ablation_restores_the_setting():
    from camu_jax.models import layers

    before = layers.WGRAD_CHUNK
    r = steps.bench_wgrad_chunking([("cnn_b16", "cnn", data.MNIST_SHAPE, 16, 1)], repeats=1)[
        "cnn_b16"
    ]
    assert _positive(r["plain_steps_per_s"], r["chunked_steps_per_s"])
    assert layers.WGRAD_CHUNK == before


def test_study_measures_from_phases():
    phases = [
        {"phase": "original", "seconds": 1.0, "compile_seconds": 0.5},
        {"phase": "retrain", "seconds": 2.0, "compile_seconds": 0.0},
        {"phase": "camu", "seconds": 4.0, "compile_seconds": 1.0},
        {"phase": "evaluation", "seconds": 8.0, "compile_seconds": 0.25},
    ]
    m = study.summarize(phases, wall=20.0)
    assert m == {
        "wall_s": 20.0,
        "compile_s": 1.75,
        "phases_s": 15.0,
        "training_s": 3.0,
        "unlearning_s": 4.0,
        "evaluation_s": 8.0,
        "relearning_s": None,  # no relearn phase ran
    }


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--study-args", "--workdir /tmp/x"], "--workdir is set by the benchmark"),
        (["--study-args", "--population 1"], "unrecognized arguments: --population 1"),
        (["--study-args", "--original-epochs 0"], "study: original epochs"),
        (["--study-args", "--model resnet18"], "model 'resnet18'"),
        (["--study-seeds", "0,x"], "--study-seeds '0,x'"),
        (["--study-repeats", "0"], "--study-repeats 0"),
        (["--study-manual-dir", "/nonexistent/mnist"], "/nonexistent/mnist is not a directory"),
        (["--only", "study,nope"], "unknown ['nope']"),
    ],
)
def test_study_flags_are_checked_before_anything_runs(tmp_path, capsys, flags, message):
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exc:
        cli.main(["--out", str(out), "--only", "study", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    assert not out.exists()


def test_pytorch_cnn_takes_digits_images():
    """The PyTorch port's CNN on 8x8 digits (the study benchmark's default data): the Flax
    CNN's weights for that shape convert into it, and it gives one logit row per image."""
    import jax
    import torch

    from camu_jax.models import create_model, init_variables
    from experiments.pytorch_reference import models
    from experiments.pytorch_reference.convert import flax_to_torch

    variables = init_variables(create_model("cnn", num_classes=10), jax.random.key(0), (8, 8, 1))
    module = models.CNN(num_classes=10, image_size=8)
    flax_to_torch(variables, module)  # raises on a shape mismatch
    logits, embedding = module(torch.zeros(3, 1, 8, 8))
    assert logits.shape == (3, 10) and embedding.shape == (3, 256)


def test_study_runs_both_modes_and_the_pytorch_estimate(tmp_path):
    """The whole `--only study` path on the smallest study: digits, one seed, one forget class,
    one original epoch, no relearning. Both modes run as their own processes."""
    out = tmp_path / "bench.json"
    extra = "--original-epochs 1 --no-relearn --forget-class 0"
    argv = ["--out", str(out), "--only", "study", "--study-seeds", "0", "--study-args", extra]
    assert cli.main(argv) == 0
    s = json.loads(out.read_text())["study"]
    assert s["dataset"] == "digits" and s["seeds"] == [0] and s["repeats"] == 1
    assert s["counts"] == {
        "originals": 1,
        "retrains": 1,
        "camu": 1,
        "evaluations": 3,
        "relearning": 0,
    }
    sizes = {"population": None, "sequential": 1}
    for mode, size in sizes.items():
        r = s[mode]
        assert set(study.MEASURES) <= set(r) and len(r["runs"]) == 1
        run = r["runs"][0]
        assert run["population_size"] == size  # what that process's results.json says
        assert [p["phase"] for p in run["phases"]] == ["original", "retrain", "camu", "evaluation"]
        assert r["relearning_s"] is None
        assert _positive(r["wall_s"], r["training_s"], r["unlearning_s"], r["evaluation_s"])
        # The process ran its phases: its wall time holds them all.
        assert r["phases_s"] < r["wall_s"]
    assert s["sequential"]["runs"][0]["mesh"]["member"] == 1
    ratio = s["population_over_sequential"]
    assert ratio["wall_s"] == pytest.approx(s["population"]["wall_s"] / s["sequential"]["wall_s"])
    ref = s["pytorch_multiplied_out"]
    assert ref["multiplied_out"] is True and "not run" in ref["note"]
    p = ref["per_run"]
    assert _positive(p["original_epoch_s"], p["retrain_epoch_s"], p["camu_s"], p["evaluation_s"])
    assert ref["training_s"] == pytest.approx(p["original_s"] + p["retrain_s"])
    assert ref["evaluation_s"] == pytest.approx(3 * p["evaluation_s"])
    assert ref["timed_on"]["split_sizes"]["forget"] > 0 and ref["relearning_s"] is None


def test_placement_flags_are_checked_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exc:
        cli.main(["--out", str(out), "--only", "placement", "--placement-scenarios", "mnist,x"])
    assert exc.value.code == 2
    assert "--placement-scenarios" in capsys.readouterr().err and not out.exists()


def test_placement_runs_both_modes_and_prints_ratios(monkeypatch, capsys):
    """`--only placement`'s machinery with the study runs replaced (their own test runs them):
    both modes per scenario, in that order, the ratios default / one at a time per phase, the
    default's recorded placements, the printed table."""
    from experiments.benchmark import placement

    calls = []

    def run_once(mode, args, log=print):
        calls.append((mode, args))
        scale = 3.0 if mode == "population" else 2.0
        phases = [
            {
                "phase": "original",
                "seconds": scale,
                "compile_seconds": 1.0,
                "placement": [{"x": 1}],
            },
            {"phase": "evaluation", "seconds": 2 * scale, "compile_seconds": 0.0},
        ]
        return {**study.summarize(phases, wall=10 * scale), "phases": phases}

    monkeypatch.setattr(study, "run_once", run_once)
    r = placement.bench_placement(["mnist_class0", "digits_main"], data.DEFAULT_MNIST_DIR)
    assert [c[0] for c in calls] == ["population", "sequential"] * 2
    mnist_args = calls[0][1]
    assert "--no-relearn" in mnist_args and mnist_args[mnist_args.index("--dataset") + 1] == "mnist"
    assert "--no-relearn" not in calls[2][1]  # the digits main job relearns, as it runs
    ratios = r["mnist_class0"]["default_over_one_at_a_time"]
    assert ratios == {"wall": 1.5, "original": 1.5, "evaluation": 1.5}
    assert r["mnist_class0"]["placements"] == {"original": [{"x": 1}]}
    placement.print_placement(r)
    printed = capsys.readouterr().out
    assert "placement.digits_main" in printed and "1.50" in printed


def _compile_phase(name, seconds, compile_s, compiled, loaded):
    return {
        "phase": name,
        "seconds": seconds,
        "compile_seconds": compile_s,
        "programs_compiled": compiled,
        "programs_loaded": loaded,
        "xla_compile_seconds": compile_s if compiled else 0.0,
        "cache_load_seconds": 0.0 if compiled else compile_s,
    }


def _fake_unlearn(calls):
    """A stand-in for `compile.run_process`: a cache dir seen before makes a warm run (what the
    cold run compiled is loaded); a sweep of the tuned method gives one method per point."""
    from experiments.benchmark import compile as compile_part

    seen = set()

    def run(args, workdir, cache, checkpoints=None, log=print):
        calls.append((list(args), str(cache), checkpoints is not None))
        warm = str(cache) in seen
        seen.add(str(cache))
        compiled, loaded = (0, 4) if warm else (4, 0)
        phases = [
            _compile_phase("original", 4.0, 0.5 if warm else 3.0, compiled, loaded),
            _compile_phase("evaluation", 2.0, 0.5 if warm else 1.0, compiled, loaded),
        ]
        settings = [a for a in args if a.startswith("ft.learning_rate=")]
        configs, methods = {}, {}
        if settings:
            values = [float(v) for v in settings[0].split("=", 1)[1].split(",")]
            phases.insert(1, _compile_phase("ft", 1.0 + len(values), 0.5, 1, 0))
            for v in values:
                name = "ft" if len(values) == 1 else f"ft[learning_rate={v}]"
                configs[name] = {"learning_rate": v, "epochs": 10}
                methods[name] = {k: 10 * v for k in compile_part.SCORES}
        return {
            "phases": phases,
            "method_configs": configs,
            "runs": [{"methods": methods}],
            "wall_s": sum(p["seconds"] for p in phases) + 1.0,
        }

    return run


def test_compile_job_tables_from_results(monkeypatch, capsys):
    """`--only compile`'s measures from results.json phases (processes replaced by a fake): cold
    then warm on one cache, run seconds = phase - compile seconds, the compile share, the tune
    job's sides, ratios and score differences, the printed tables."""
    from experiments.benchmark import compile as compile_part

    calls = []
    monkeypatch.setattr(compile_part, "run_process", _fake_unlearn(calls))
    settings = {"jobs": ["main", "tune"], "extra": ["--original-epochs", "1"], "grid": [0.1, 0.2]}
    out, status = compile_part.bench_compile(settings, log=lambda *_: None)
    assert status == 0
    main = out["main"]
    assert calls[0][0] == ["--original-epochs", "1"] and calls[0][1] == calls[1][1]
    cold, warm = main["cold"]["totals"], main["warm"]["totals"]
    assert cold == {
        "wall_s": 7.0,
        "phases_s": 6.0,
        "compile_s": 4.0,
        "run_s": 2.0,
        "ahead_s": 0.0,  # nothing compiled ahead in these records
        "compile_share": pytest.approx(4 / 6),
        "programs_compiled": 8,
        "programs_loaded": 0,
    }
    assert warm["programs_compiled"] == 0 and warm["programs_loaded"] == 8
    assert warm["compile_share"] == pytest.approx(1 / 6)
    assert main["warm"]["phases"][0]["run_s"] == pytest.approx(3.5)

    tune = out["tune"]
    pop_args, *singles = [c for c in calls[2:]]
    assert "ft.learning_rate=0.1,0.2" in pop_args[0] and pop_args[2]
    assert [s[0][s[0].index("--set") + 1] for s in singles] == [
        "ft.learning_rate=0.1",
        "ft.learning_rate=0.2",
    ]
    assert singles[0][1] == singles[1][1] != pop_args[1]  # the points share one cache
    assert tune["population"]["processes"] == 1 and tune["one_at_a_time"]["processes"] == 2
    # population: phases 4 + 3 + 2 = 9 s, ft 3 s; one at a time: 4+2+2, then warm 4+2+2.
    assert tune["population"]["totals"]["phases_s"] == 9.0
    assert tune["one_at_a_time"]["totals"]["phases_s"] == 16.0
    ratio = tune["one_at_a_time_over_population"]
    assert ratio["phases_s"] == pytest.approx(16 / 9)
    assert ratio["method_phase_s"] == pytest.approx(4 / 3)
    assert ratio["wall_s"] == pytest.approx(18 / 10)
    assert tune["scores"]["max_abs_difference"] == {k: 0.0 for k in compile_part.SCORES}

    compile_part.print_compile(out)
    printed = capsys.readouterr().out
    assert "compile.main: python -m experiments.unlearn --original-epochs 1" in printed
    assert "67 % of the phases' seconds cold, 17 % warm" in printed
    assert "compile.tune: ft learning_rate grid of 2 points" in printed
    assert "phases_s 1.78x" in printed and "learning_rate=0.2" in printed


def test_compile_tune_is_skipped_where_the_cli_refuses_a_sweep(monkeypatch, capsys):
    from experiments.benchmark import compile as compile_part

    def refuse(args):
        raise ValueError("--set ft.learning_rate=0.1,0.2: expected float")

    calls = []
    monkeypatch.setattr(compile_part, "check_args", refuse)
    monkeypatch.setattr(compile_part, "run_process", _fake_unlearn(calls))
    out = compile_part.bench_tune([0.1, 0.2], log=lambda *_: None)
    assert not calls and "expected float" in out["skipped"]
    compile_part.print_compile({"tune": out})
    assert "skipped: the CLI refuses a comma list" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--compile-jobs", "main,nope"], "unknown ['nope']"),
        (["--compile-args", "--workdir /tmp/x"], "--workdir is set by the benchmark"),
        (["--compile-args", "--original-epochs 0"], "original epochs"),
        (["--compile-tune-grid", "0.1"], "two or more values"),
        (["--compile-tune-grid", "0.1,x"], "expected numbers"),
    ],
)
def test_compile_flags_are_checked_before_anything_runs(tmp_path, capsys, flags, message):
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exc:
        cli.main(["--out", str(out), "--only", "compile", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    assert not out.exists()


@pytest.mark.slow
def test_compile_tune_runs_both_sides(tmp_path):
    """The tune job for real on its smallest grid (two points, one original epoch): the CLI's
    sweep as one population, each point as its own process, the same scores."""
    out = tmp_path / "bench.json"
    argv = ["--out", str(out), "--only", "compile", "--compile-jobs", "tune"]
    argv += ["--compile-tune-grid", "0.01,0.02", "--compile-args", "--original-epochs 1"]
    assert cli.main(argv) == 0
    tune = json.loads(out.read_text())["compile"]["tune"]
    if "skipped" in tune:
        pytest.skip(tune["skipped"])
    pop, one = tune["population"], tune["one_at_a_time"]
    assert pop["processes"] == 1 and one["processes"] == 2
    assert [p["phase"] for p in pop["phases"]] == ["original", "retrain", "ft", "evaluation"]
    # The second point restores the first one's original and retrained models.
    assert [p["phase"] for p in one["phases"] if p["process"] == 1][:2] == ["original", "retrain"]
    assert pop["totals"]["programs_compiled"] > 0 and pop["totals"]["programs_loaded"] == 0
    assert one["totals"]["programs_loaded"] > 0  # the second process loads the first's programs
    for r in pop["phases"] + one["phases"]:
        assert r["run_s"] == pytest.approx(r["seconds"] - r["compile_s"])
    assert set(tune["scores"]["population"]) == {"0.01", "0.02"}
    diff = tune["scores"]["max_abs_difference"]
    assert all(v is not None and v <= 0.5 for v in diff.values()), diff


def test_compile_rows_count_programs_compiled_ahead_with_their_phase():
    from experiments.benchmark import compile as compile_part

    programs = {"compiled": {"jit(loop)": 1}, "loaded": {}}
    phase = {
        "phase": "camu",
        "seconds": 2.0,
        "compile_seconds": 0.5,
        "programs_compiled": 1,
        "programs_loaded": 0,
        "xla_compile_seconds": 0.4,
        "cache_load_seconds": 0.0,
        "programs": programs,
        "compiled_ahead": {
            "seconds": 3.1,
            "compile_seconds": 3.0,
            "programs_compiled": 2,
            "programs_loaded": 1,
            "xla_compile_seconds": 2.5,
            "cache_load_seconds": 0.2,
            "programs": {"compiled": {"jit(loop)": 1, "jit(one)": 1}, "loaded": {"jit(x)": 1}},
        },
    }
    (row,) = compile_part.phase_rows([phase])
    assert (row["compile_s"], row["run_s"], row["ahead_s"]) == (0.5, 1.5, 3.0)
    assert (row["programs_compiled"], row["programs_loaded"]) == (3, 1)
    assert row["programs"] == {
        "compiled": {"jit(loop)": 2, "jit(one)": 1},
        "loaded": {"jit(x)": 1},
    }
    totals = compile_part.totals([row], wall=5.0)
    assert totals["ahead_s"] == 3.0 and totals["compile_share"] == pytest.approx(0.25)


def test_layouts_bound_is_the_best_population_over_the_default_one_at_a_time():
    from experiments.benchmark.layouts_cpu import bound

    rates = {
        "one_device": {"scan": 1250.0, "loop": 970.0},
        "one_per_device": {"scan": 2080.0, "loop": 1000.0},
        "stacked": {"scan": 1640.0, "loop": 1400.0},
    }
    # One at a time in the form the default path runs it; one_device's own rates never count
    # as a population's.
    assert bound(rates, "scan") == 2080.0 / 1250.0
    assert bound(rates, "loop") == 2080.0 / 970.0
    rates["one_device"]["loop"] = 5000.0
    assert bound(rates, "scan") == 2080.0 / 1250.0
