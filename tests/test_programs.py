"""Few programs (issue 17, item 3): what each phase of a study compiles, and why.

Keys are derived on the host (`camu_jax.keys`), small glue runs in numpy, and identical
programs of different phases share one executable (`engine.compile_shared`): a phase compiles
its own step programs and nothing else.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from camu_jax import engine

ROOT = Path(__file__).resolve().parents[1]


def test_host_eval_matches_the_compiled_init():
    """A state's init evaluated in numpy (`engine.host_eval`) equals the compiled one, value
    and dtype, leaf for leaf; an init with arithmetic beyond moving and casting values is left
    to the compiler (None)."""
    import optax

    from camu_jax.steps import sgd_traced

    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16)}

    def init(p):
        tx = optax.chain(sgd_traced(0.1, 0.9, 5e-4), optax.scale_by_adam())
        return {
            "params": p,
            "copy": jax.tree.map(jnp.array, p),
            "opt": tx.init(p),
            "step": jnp.zeros((), jnp.int32),
            "cast": p["w"].astype(jnp.bfloat16).reshape(3, 2),
        }

    stacked = jax.tree.map(lambda x: np.stack([x, x + 1]), params)
    host = engine.host_eval(jax.vmap(init), stacked)
    compiled = jax.jit(jax.vmap(init))(stacked)
    assert host is not None
    assert jax.tree.structure(host) == jax.tree.structure(compiled)
    for h, c in zip(jax.tree.leaves(host), jax.tree.leaves(compiled), strict=True):
        assert isinstance(h, np.ndarray) and h.dtype == c.dtype and h.shape == c.shape
        np.testing.assert_array_equal(h, np.asarray(c))
    assert engine.host_eval(lambda p: jax.tree.map(jnp.exp, p), params) is None


def test_identical_programs_share_one_executable():
    from camu_jax import engine

    def shared(fn, *args):
        return engine.compile_shared(jax.jit(fn).lower(*args), args)

    x = jnp.arange(4.0)
    a = shared(lambda v: v * 3.0 + 1.0, x)
    b = shared(lambda w: w * 3.0 + 1.0, x)  # another closure
    c = shared(lambda v: v * 3.0 - 1.0, x)  # another computation
    d = shared(lambda v: v * 3.0 + 1.0, jnp.arange(5.0))
    assert a is b
    assert c is not a and d is not a
    np.testing.assert_array_equal(b(x), x * 3.0 + 1.0)
    # Same computation, other argument structure: never shared (the call would not fit).
    e = shared(lambda t: t[0] * 3.0 + 1.0, (x,))
    assert e is not a
    np.testing.assert_array_equal(e((x,)), x * 3.0 + 1.0)
    # An argument the program does not read is left out of its text, yet its executable
    # checks it: other shapes there are another executable (a study's dampening step reads no
    # images: one of 96 images is not one of 1437).
    f = shared(lambda v, unused: v * 3.0 + 1.0, x, jnp.zeros(96))
    g = shared(lambda v, unused: v * 3.0 + 1.0, x, jnp.zeros(1437))
    assert f is not g
    np.testing.assert_array_equal(g(x, jnp.zeros(1437)), x * 3.0 + 1.0)


# A study of the methods named in argv[2] (FT, GA and RL, or `all` in their digits settings)
# on 96 random digits-sized images, relearning off, one run, in a fresh process with its own
# empty persistent cache; prints each phase's compile record.
STUDY = """
import json, sys
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
import numpy as np
import camu_jax
from camu_jax import methods
from camu_jax.data.pipeline import DeviceData, InputSpec
from camu_jax.models import create_model

rng = np.random.default_rng(0)
images = rng.integers(0, 256, (96, 8, 8, 1)).astype(np.uint8)
labels = np.arange(96) % 10
test_images = rng.integers(0, 256, (40, 8, 8, 1)).astype(np.uint8)
train = DeviceData.put(images, labels, spec=InputSpec())
test = DeviceData.put(test_images, np.arange(40) % 10, spec=InputSpec())
splits = camu_jax.make_splits(
    labels, camu_jax.ForgetSpec(kind="class", classes=(0,)), seed=0, num_classes=10
)
record = camu_jax.compare(
    create_model("cnn", num_classes=10),
    train=train,
    test=test,
    splits=[splits],
    seeds=[0],
    methods=(
        [methods.get(n, dataset="digits") for n in methods.REGISTRY]
        if sys.argv[2] == "all"
        else [methods.get(n, epochs=1, batch_size=16) for n in sys.argv[2].split(",")]
    ),
    train_config=camu_jax.TrainConfig(epochs=1),
    population_size=1,
    eval_workers=1,
    record=True,
)
phases = {}
for p in record["phases"]:
    entry = phases.setdefault(p["phase"], {"compiled": {}, "loaded": {}})
    # A phase's programs: what it compiled itself and what was compiled for it ahead.
    for programs in (p["programs"], p.get("compiled_ahead", {}).get("programs")):
        for kind in ("compiled", "loaded"):
            for name, n in (programs or {}).get(kind, {}).items():
                entry[kind][name] = entry[kind].get(name, 0) + n
print(json.dumps(phases))
"""


def _study_programs(tmp_path, names: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", STUDY, str(tmp_path / "xla-cache"), names],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_method_compiles_at_most_25_programs(tmp_path):
    """Issue 17's target for `--methods all` on digits: the whole study (original, retrain,
    CaMU and the 14 baselines, evaluation; relearning off), compiled or loaded, <= 25
    programs."""
    phases = _study_programs(tmp_path, "all")
    counts = {
        phase: sum(p["compiled"].values()) + sum(p["loaded"].values())
        for phase, p in phases.items()
    }
    assert sum(counts.values()) <= 25, counts


def test_a_study_compiles_its_step_programs_and_nothing_else(tmp_path):
    phases = _study_programs(tmp_path, "ft,ga,rl")

    def programs(phase):
        p = phases[phase]
        return {
            k: p["compiled"].get(k, 0) + p["loaded"].get(k, 0)
            for k in {**p["compiled"], **p["loaded"]}
        }

    # No program of a single operation (keys split or folded eagerly, a cast, a
    # concatenation): only model and state initialisations, steps and forward passes.
    allowed = {"jit(init)", "jit(<lambda>)", "jit(scan)", "jit(loop)", "jit(one)"}
    for phase in phases:
        assert set(programs(phase)) <= allowed, (phase, phases[phase])
    # The original: the model's initialisation and its step; its training state (the
    # weights, the optimizer's zeros) is built on the host (`engine.host_eval`), no program.
    # The retrain reuses both. One member on one device: a call per step (`jit(loop)`;
    # `engine.default_use_scan`).
    assert programs("original") == {"jit(init)": 1, "jit(loop)": 1}
    assert programs("retrain") == {}
    # FT, GA and RL: their steps alone (their SGD states built on the host).
    assert programs("ft") == {"jit(loop)": 1}
    assert programs("ga") == {"jit(loop)": 1}
    assert programs("rl") == {"jit(loop)": 1}
    # Evaluation: train and test joined in host memory (a CPU's devices' own), one forward
    # pass over both.
    assert programs("evaluation") == {"jit(one)": 1}
