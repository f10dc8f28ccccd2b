"""The benchmark's machinery on tiny inputs: the JSON layout, and that both sides really run.

Timings themselves are never asserted (the machine is shared); `python -m experiments.benchmark`
produces them. Needs torch, like the parity tests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from experiments import benchmark  # noqa: E402


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
    r = benchmark.bench_step(
        "cnn", benchmark.MNIST_SHAPE, 4, steps=2, repeats=2, warmup=1, teacher=True
    )
    assert _positive(r["jax_steps_per_s"], r["torch_steps_per_s"], r["jax_teacher_steps_per_s"])
    assert r["speedup"] == pytest.approx(r["jax_steps_per_s"] / r["torch_steps_per_s"])
    assert len(r["pair_speedups"]) == 2 and r["jax_compile_s"] > 0


def test_end_to_end_and_eval_on_tiny_data(tiny_data):
    variables, state_dict = benchmark._original_weights()
    e2e = benchmark.bench_end_to_end(
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
        assert _positive(r["jax_s"], r["torch_s"], r["jax_compile_s"])
        # Every JAX run starts from empty caches: compilation is inside jax_s.
        assert r["jax_compile_s"] < r["jax_s"]
        assert r["speedup"] == pytest.approx(r["torch_s"] / r["jax_s"])
    ev = benchmark.bench_eval(tiny_data, variables, state_dict, repeats=1)
    assert ev["examples"] == 96
    # Same weights on both sides: the same predictions.
    assert ev["accuracy_jax"] == pytest.approx(ev["accuracy_torch"], abs=1.5 / 96)


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
        "device": {
            "jax_device": "cpu:cpu",
            "jax_device_count": 1,
            "torch_device": "cpu",
            "torch_device_name": "x",
            "torch_threads": 2,
        },
        "data": "synthetic",
    }
    benchmark.print_table(results)
    out = capsys.readouterr().out
    assert "step.cnn_b32" in out and "2.00x" in out and "3.00x" in out


def test_main_writes_the_json(tmp_path):
    out = tmp_path / "bench.json"
    assert benchmark.main(["--out", str(out), "--quick", "--only", "eval"]) == 0
    results = json.loads(out.read_text())
    assert {"device", "versions", "eval", "quick"} <= set(results)
    assert results["versions"]["jax"] and results["device"]["jax_device_count"] >= 1
    assert results["eval"]["examples"] == benchmark.MNIST_TEST


def test_wgrad_chunking_ablation_restores_the_setting():
    from camu_jax.models import layers

    before = layers.WGRAD_CHUNK
    r = benchmark.bench_wgrad_chunking(
        [("cnn_b16", "cnn", benchmark.MNIST_SHAPE, 16, 1)], repeats=1
    )["cnn_b16"]
    assert _positive(r["plain_steps_per_s"], r["chunked_steps_per_s"])
    assert layers.WGRAD_CHUNK == before
