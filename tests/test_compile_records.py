"""What was compiled: `engine.Timer` and results.json's phases tell the programs XLA compiled
from those loaded from the persistent compilation cache (issue 17, item 6)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One process: a fresh persistent cache dir given on the command line, every program cached
# however small or fast, one tiny jitted function timed.
TINY = """
import json, sys
import jax, jax.numpy as jnp
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from camu_jax import engine

x = jnp.arange(5.0)
x.block_until_ready()
timer = engine.Timer()

@jax.jit
def tiny_program(x):
    return jnp.sin(x) * 2.0 + 1.0

tiny_program(x).block_until_ready()
print(json.dumps({**timer.compile_record(), "programs_built": timer.programs}))
"""


def _tiny(cache: Path, script: str = TINY) -> dict:
    """`script`'s last printed JSON line, run in a fresh process with the cache dir `cache`."""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(cache)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    cache = tmp_path / "xla-cache"
    first, second = _tiny(cache), _tiny(cache)
    name = "jit(tiny_program)"
    assert first["programs"]["compiled"] == {name: 1}, first
    assert first["programs_compiled"] == 1 and first["programs_loaded"] == 0, first
    assert first["xla_compile_seconds"] > 0 and first["cache_load_seconds"] == 0
    assert second["programs"]["loaded"] == {name: 1}, second
    assert second["programs_compiled"] == 0 and second["programs_loaded"] == 1, second
    assert second["xla_compile_seconds"] == 0 and second["cache_load_seconds"] > 0
    # `Timer.programs` keeps its meaning: every program built, compiled or loaded.
    assert first["programs_built"] == second["programs_built"] == {name: 1}
    for r in (first, second):  # tracing and lowering, plus the backend part
        backend = r["xla_compile_seconds"] + r["cache_load_seconds"]
        assert r["compile_seconds"] >= backend


# One process: a program built through `engine.compile_shared`, with its cost for `place`.
SHARED = """
import json, os, sys
import jax, jax.numpy as jnp
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from camu_jax import engine

x = jnp.arange(64.0).reshape(8, 8)
x.block_until_ready()
timer = engine.Timer()
lowered = jax.jit(lambda x: jnp.tanh(x @ x.T) * 3.0 - x).lower(x)
_, seconds = engine.compile_shared(lowered, (x,), cost=True)
with open(os.path.join(sys.argv[1], engine.COMPILE_COSTS_FILE)) as f:
    record = json.load(f)
print(json.dumps({**timer.compile_record(), "cost": seconds, "record": record}))
"""


def test_a_program_loaded_from_the_cache_costs_what_compiling_it_cost(tmp_path):
    # `place` weighs other layouts against what the program it timed first costs to compile:
    # a warm run, which loads that program from the persistent cache in a fraction of the
    # time, must weigh them as its cold run did (the layouts it tries are then cached too).
    cache = tmp_path / "xla-cache"
    first, second = runs = [_tiny(cache, SHARED), _tiny(cache, SHARED)]
    assert first["programs_compiled"] == 1 and second["programs_loaded"] == 1, runs
    # The first run compiled it and recorded its seconds; the second loaded it and reports
    # those recorded seconds as its cost, not its own (the load's).
    ((fingerprint, recorded),) = first["record"].items()
    assert second["record"] == {fingerprint: recorded}
    # Its wall seconds around `compile()`, which holds JAX's backend-compile event.
    assert 0 < first["xla_compile_seconds"] <= recorded
    assert first["cost"] == recorded and second["cost"] == recorded
    assert second["cache_load_seconds"] > 0


def test_compile_records_add_up():
    from camu_jax import engine

    a = {
        "compile_seconds": 1.0,
        "xla_compile_seconds": 0.5,
        "cache_load_seconds": 0.0,
        "programs_compiled": 2,
        "programs_loaded": 0,
        "programs": {"compiled": {"jit(a)": 1, "jit(b)": 1}, "loaded": {}},
    }
    b = {
        "compile_seconds": 0.25,
        "xla_compile_seconds": 0.0,
        "cache_load_seconds": 0.125,
        "programs_compiled": 0,
        "programs_loaded": 2,
        "programs": {"compiled": {}, "loaded": {"jit(a)": 2}},
    }
    total = engine.sum_compile_records([a, b, a])
    assert total == {
        "compile_seconds": 2.25,
        "xla_compile_seconds": 1.0,
        "cache_load_seconds": 0.125,
        "programs_compiled": 4,
        "programs_loaded": 2,
        "programs": {"compiled": {"jit(a)": 2, "jit(b)": 2}, "loaded": {"jit(a)": 2}},
    }
    assert a["programs"]["compiled"] == {"jit(a)": 1, "jit(b)": 1}  # inputs left alone


def _main_job(workdir: Path, cache: Path) -> list[dict]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.unlearn",
            "--no-progress",
            "--original-epochs",
            "1",
            "--no-relearn",
            "--xla-cache",
            str(cache),
            "--workdir",
            str(workdir),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((workdir / "results.json").read_text())["phases"]


def _with_ahead(phase: dict) -> dict:
    """The phase's compile record plus its `compiled_ahead` one (programs by name summed)."""
    ahead = phase.get("compiled_ahead")
    if ahead is None:
        return phase
    out = dict(phase)
    for key in ("programs_compiled", "programs_loaded", "xla_compile_seconds"):
        out[key] = phase[key] + ahead[key]
    out["cache_load_seconds"] = phase["cache_load_seconds"] + ahead["cache_load_seconds"]
    out["programs"] = {
        kind: {
            name: phase["programs"][kind].get(name, 0) + ahead["programs"][kind].get(name, 0)
            for name in {**phase["programs"][kind], **ahead["programs"][kind]}
        }
        for kind in ("compiled", "loaded")
    }
    return out


@pytest.mark.slow
def test_a_warm_main_job_compiles_nothing(tmp_path):
    """The main job from an empty cache, then again on that cache (a fresh work dir, so that
    nothing is restored): the second run loads every program the first compiled, phase by
    phase, and compiles none."""
    cache = tmp_path / "xla-cache"
    cold = _main_job(tmp_path / "cold", cache)
    warm = _main_job(tmp_path / "warm", cache)
    assert [p["phase"] for p in cold] == [p["phase"] for p in warm]
    # A phase's record with what was compiled for it ahead (`compiled_ahead`), added in.
    cold, warm = [_with_ahead(p) for p in cold], [_with_ahead(p) for p in warm]
    assert sum(p["programs_compiled"] for p in cold) > 0
    for c, w in zip(cold, warm, strict=True):
        where = (w["phase"], w["programs"])
        assert w["programs_compiled"] == 0 and w["xla_compile_seconds"] == 0, where
        built = dict(c["programs"]["loaded"])
        for name, n in c["programs"]["compiled"].items():
            built[name] = built.get(name, 0) + n
        assert w["programs"]["loaded"] == built, (where, c["programs"])
        assert w["programs_loaded"] == sum(built.values())
        if built:
            assert w["programs_loaded"] > 0 and w["cache_load_seconds"] > 0, where
        for p in (c, w):
            assert p["programs_compiled"] == sum(p["programs"]["compiled"].values())
    # The phases that build programs on this job (the retrain reuses the original's).
    assert {p["phase"] for p in warm if p["programs_loaded"]} >= {
        "original",
        "camu",
        "evaluation",
    }
