"""Speed of camu_jax against the PyTorch port of the reference (`experiments.pytorch_reference`).

    python -m experiments.benchmark --out FILE.json [--quick] [--mnist-dir DIR]

What is timed (see docs/benchmarks.md):

* `step.*`: one CaMU double step (step A + step B) on a fixed random batch. JAX: `camu_step`
  jitted with `donate_argnums=0`, teacher embeddings passed in (the library computes them once
  per run); `jax_teacher_steps_per_s` also times a jitted step that recomputes the two teacher
  forward passes as the reference does (the same work as the PyTorch step). PyTorch: the
  reference's step (`pytorch_reference.camu.camu_step`) on device tensors.
* `end_to_end.*`: the reference's "time": from the start of counterfactual construction to the
  end of the last unlearning epoch, MNIST shapes, the reference's presets. JAX: the library's
  `camu_jax.unlearning.unlearn`; PyTorch: `pytorch_reference.camu.unlearn` (DataLoaders at batch
  32, counterfactuals built in a Python pass, teacher recomputed every step).
* `eval`: one accuracy pass over the 10 000 test images (PyTorch at batch 32 as the reference,
  JAX with the library's `predict_logits`).
* `memory`: peak memory of each side run alone in its own subprocess on the class preset
  (CPU: `ru_maxrss`; GPU: peak device bytes as well).

JAX and PyTorch run alternately (A B A B ...) in this process, so both see the same machine
state; medians over the repeats are reported, with the ratio of each A/B pair. Step figures are
after warm-up (compilation reported as `jax_compile_s`). End-to-end JAX runs start from empty
compilation caches, so `jax_s` includes compilation; its compile share is `jax_compile_s`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NUM_CLASSES = 10
MNIST_SHAPE = (28, 28, 1)
MNIST_TRAIN, MNIST_TEST, MNIST_CLASS0 = 60000, 10000, 5923
DEFAULT_MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
# The reference's MNIST presets (camu_reference.md, section 4).
PRESETS = {
    "mnist_class": {"epochs": 2, "impair_lr": 1e-3, "kl_lr": 4e-4},
    "mnist_random": {"epochs": 10, "impair_lr": 5e-4, "kl_lr": 4e-4},
}
STEP_LRS = {"kl_lr": 4e-4, "impair_lr": 1e-3}


# ----------------------------------------------------------------------------- environment


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _gpu_present() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def _sync_torch(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _cpu_model() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment() -> dict:
    import flax
    import jax
    import jaxlib
    import optax
    import torch

    jax_dev = jax.devices()[0]
    info = {
        "device": {
            "jax_backend": jax.default_backend(),
            "jax_device": f"{jax_dev.platform}:{getattr(jax_dev, 'device_kind', '')}",
            "jax_device_count": jax.device_count(),
            "torch_device": _torch_device(),
            "torch_device_name": torch.cuda.get_device_name(0)
            if torch.cuda.is_available()
            else _cpu_model(),
            "torch_device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "torch_threads": torch.get_num_threads(),
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": list(os.getloadavg()),
        },
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
    }
    return info


# ----------------------------------------------------------------------------- timing helpers


def _median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def alternate(runners: dict, repeats: int) -> dict[str, list[float]]:
    """Calls each runner in turn (A B A B ...) `repeats` times; returns seconds per call."""
    out = {k: [] for k in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            out[name].append(run())
    return out


class CompileTimer:
    """Sums JAX's own compilation-event durations (tracing, lowering, XLA compile)."""

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self):
        self.total = 0.0
        self.active = False
        from jax import monitoring

        monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **_kwargs):
        if self.active and event in self.EVENTS:
            self.total += duration

    @contextlib.contextmanager
    def measure(self):
        self.total, self.active = 0.0, True
        try:
            yield self
        finally:
            self.active = False


# ----------------------------------------------------------------------------- step benchmark


def _random_camu_batch(rng, batch: int, shape) -> dict:
    x_s = rng.random((batch, *shape), dtype=np.float32)
    return {
        "x_f": rng.random((batch, *shape), dtype=np.float32),
        "x_s": x_s,
        "x_cf": x_s + rng.random((batch, *shape), dtype=np.float32),
        "y_s": rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
        "y_cf": rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
    }


class JaxStepRunner:
    """`camu_step`, jitted with the state donated; optionally with the teacher inside."""

    def __init__(self, name, shape, batch, *, with_teacher: bool, seed: int = 0):
        import jax
        import jax.numpy as jnp

        from camu_jax.models import create_model
        from camu_jax.steps import adam_l2, apply_model, camu_step, init_camu_state, init_variables

        model = create_model(name, num_classes=NUM_CLASSES)
        self.teacher = init_variables(model, jax.random.key(seed), shape)
        kl_tx, ce_tx = adam_l2(STEP_LRS["kl_lr"]), adam_l2(STEP_LRS["impair_lr"])
        self.state = init_camu_state(self.teacher, kl_tx, ce_tx)
        step = functools.partial(camu_step, model=model, kl_tx=kl_tx, ce_tx=ce_tx)
        host = _random_camu_batch(np.random.default_rng(seed), batch, shape)
        mask = jnp.ones((batch,), jnp.float32)
        if with_teacher:

            def full(state, teacher, b):
                embed = functools.partial(
                    apply_model, model, teacher["params"], teacher["batch_stats"], train=False
                )
                b = dict(b, z0_s=embed(b["x_s"])[1], z0_cf=embed(b["x_cf"])[1])
                del b["x_cf"]
                return step(state, b)

            self.batch = jax.device_put({**host, "mask_f": mask, "mask_s": mask})
            fn = jax.jit(full, donate_argnums=0)
            self.call = lambda state: fn(state, self.teacher, self.batch)
        else:
            embed = jax.jit(
                lambda v, x: apply_model(model, v["params"], v["batch_stats"], x, train=False)[1]
            )
            b = {k: v for k, v in host.items() if k != "x_cf"}
            b.update(z0_s=embed(self.teacher, host["x_s"]), z0_cf=embed(self.teacher, host["x_cf"]))
            self.batch = jax.device_put({**b, "mask_f": mask, "mask_s": mask})
            fn = jax.jit(step, donate_argnums=0)
            self.call = lambda state: fn(state, self.batch)
        timer = CompileTimer()
        start = time.perf_counter()
        with timer.measure():
            self.state, metrics = self.call(self.state)
            jax.block_until_ready(self.state)
        self.first_call_s = time.perf_counter() - start
        self.compile_s = timer.total
        self._jax = jax

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        state = self.state
        for _ in range(steps):
            state, _ = self.call(state)
        self._jax.block_until_ready(state)
        self.state = state
        return time.perf_counter() - start


class TorchStepRunner:
    """The reference's double step on fixed device tensors."""

    def __init__(self, name, shape, batch, *, seed: int = 0):
        import torch

        from experiments.pytorch_reference import camu, models

        self.device = _torch_device()
        torch.manual_seed(seed)
        self.teacher = models.create_model(name, num_classes=NUM_CLASSES).to(self.device)
        self.new = copy.deepcopy(self.teacher)
        self.teacher.eval()
        self.new.train()
        self.opt1, self.opt2 = camu.make_optimizers(self.new, **STEP_LRS)
        host = _random_camu_batch(np.random.default_rng(seed), batch, shape)

        def t(x):
            x = torch.from_numpy(np.array(x, copy=True))
            if x.ndim == 4:
                x = torch.from_numpy(np.array(x.numpy().transpose(0, 3, 1, 2), order="C"))
            return x.to(self.device)

        b = {k: t(v) for k, v in host.items()}
        self.args = (b["x_f"], b["x_cf"], b["y_cf"].long(), b["x_s"], b["y_s"].long())
        self._step = camu.camu_step

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self._step(self.teacher, self.new, self.opt1, self.opt2, *self.args)
        _sync_torch(self.device)
        return time.perf_counter() - start


def bench_step(name, shape, batch, *, steps: int, repeats: int, warmup: int, teacher: bool):
    jax_runner = JaxStepRunner(name, shape, batch, with_teacher=False)
    torch_runner = TorchStepRunner(name, shape, batch)
    runners = {"jax": functools.partial(jax_runner.run, steps)}
    compile_s = {"jax_compile_s": jax_runner.compile_s, "jax_first_call_s": jax_runner.first_call_s}
    if teacher:
        jt = JaxStepRunner(name, shape, batch, with_teacher=True)
        runners["jax_teacher"] = functools.partial(jt.run, steps)
        compile_s["jax_teacher_compile_s"] = jt.compile_s
    runners["torch"] = functools.partial(torch_runner.run, steps)
    if warmup:
        jax_runner.run(warmup)
        torch_runner.run(warmup)
        if teacher:
            jt.run(warmup)
    times = alternate(runners, repeats)
    rate = {k: [steps / s for s in v] for k, v in times.items()}
    out = {
        "jax_steps_per_s": _median(rate["jax"]),
        "torch_steps_per_s": _median(rate["torch"]),
        "speedup": _median(rate["jax"]) / _median(rate["torch"]),
        "pair_speedups": [j / t for j, t in zip(rate["jax"], rate["torch"], strict=True)],
        "steps_per_repeat": steps,
        "repeats": repeats,
        "batch": batch,
        "input_shape": list(shape),
        **compile_s,
    }
    if teacher:
        out["jax_teacher_steps_per_s"] = _median(rate["jax_teacher"])
        out["speedup_same_work"] = _median(rate["jax_teacher"]) / _median(rate["torch"])
    return out


def bench_wgrad_chunking(configs, *, repeats: int) -> dict:
    """Ablation, JAX only: the CaMU double step with and without `WGRAD_CHUNK` weight gradients
    (`camu_jax.models.layers`), alternated in one process. On GPU/TPU both are the same program."""
    import jax

    from camu_jax.models import layers

    saved = layers.WGRAD_CHUNK
    out = {}
    try:
        for key, name, shape, batch, steps in configs:
            runners = {}
            for variant, chunk in (("plain", 10**9), ("chunked", saved)):
                layers.WGRAD_CHUNK = chunk  # Read at trace time, which happens in __init__.
                runner = JaxStepRunner(name, shape, batch, with_teacher=False)
                runners[variant] = functools.partial(runner.run, steps)
            times = alternate(runners, repeats)
            rate = {k: [steps / t for t in v] for k, v in times.items()}
            out[key] = {
                "plain_steps_per_s": _median(rate["plain"]),
                "chunked_steps_per_s": _median(rate["chunked"]),
                "speedup": _median(rate["chunked"]) / _median(rate["plain"]),
                "pair_speedups": [
                    c / p for p, c in zip(rate["plain"], rate["chunked"], strict=True)
                ],
                "backend": jax.default_backend(),
                "batch": batch,
            }
            print(f"[benchmark]   wgrad_chunking.{key}: {json.dumps(out[key])}", flush=True)
    finally:
        layers.WGRAD_CHUNK = saved
    return out


# ----------------------------------------------------------------------------- data


def load_mnist(mnist_dir: Path | None, synthetic: bool, seed: int = 0) -> dict:
    """uint8 `[N, 28, 28, 1]` images and int labels; real MNIST unless `synthetic` or absent."""
    if not synthetic and mnist_dir is not None and mnist_dir.is_dir():
        try:
            from camu_jax.data.builders import read_idx

            return {
                "train_images": read_idx(mnist_dir / "train-images-idx3-ubyte.gz")[..., None],
                "train_labels": read_idx(mnist_dir / "train-labels-idx1-ubyte.gz").astype(np.int32),
                "test_images": read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")[..., None],
                "test_labels": read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz").astype(np.int32),
                "data": "mnist",
            }
        except (OSError, ValueError, ImportError) as err:
            print(f"[benchmark] could not read MNIST from {mnist_dir} ({err}); using synthetic")
    rng = np.random.default_rng(seed)
    # As many class-0 items as MNIST has (5923), so both presets have MNIST's sizes.
    labels = np.concatenate(
        [np.zeros(MNIST_CLASS0, np.int32), rng.integers(1, NUM_CLASSES, MNIST_TRAIN - MNIST_CLASS0)]
    )
    return {
        "train_images": rng.integers(0, 256, (MNIST_TRAIN, *MNIST_SHAPE), dtype=np.uint8),
        "train_labels": rng.permutation(labels).astype(np.int32),
        "test_images": rng.integers(0, 256, (MNIST_TEST, *MNIST_SHAPE), dtype=np.uint8),
        "test_labels": rng.integers(0, NUM_CLASSES, MNIST_TEST).astype(np.int32),
        "data": "synthetic",
    }


def make_splits(labels, preset: str, seed: int = 0):
    from camu_jax.data.splits import ForgetSpec
    from camu_jax.data.splits import make_splits as _make

    spec = (
        ForgetSpec(kind="class", classes=(0,))
        if preset == "mnist_class"
        else ForgetSpec(kind="random", fraction=0.1)
    )
    return _make(labels, spec, seed=seed, num_classes=NUM_CLASSES)


# ----------------------------------------------------------------------------- end to end


class JaxEndToEnd:
    def __init__(self, data: dict, variables: dict):
        import jax

        from camu_jax import sharding
        from camu_jax.data.pipeline import InputSpec
        from camu_jax.models import create_model

        self.jax = jax
        self.model = create_model("cnn", num_classes=NUM_CLASSES)
        self.mesh = sharding.make_mesh()
        self.images = sharding.replicate(data["train_images"], self.mesh)
        self.labels = sharding.replicate(data["train_labels"], self.mesh)
        self.host_labels = data["train_labels"]
        self.variables = variables
        self.spec = InputSpec()
        self.timer = CompileTimer()

    def run(self, preset: str, splits, epochs: int, seed: int) -> dict:
        from camu_jax.unlearning import CamuConfig, unlearn

        p = PRESETS[preset]
        config = CamuConfig(epochs=epochs, kl_lr=p["kl_lr"], impair_lr=p["impair_lr"])
        with self.timer.measure():
            start = time.perf_counter()
            variables, info = unlearn(
                self.model,
                self.variables,
                images=self.images,
                labels=self.labels,
                splits=splits,
                num_classes=NUM_CLASSES,
                spec=self.spec,
                mesh=self.mesh,
                config=config,
                seed=seed,
                progress=False,
            )
            self.jax.block_until_ready(variables)
            wall = time.perf_counter() - start
        return {"s": wall, "info_s": float(info["seconds"]), "compile_s": self.timer.total}


class TorchEndToEnd:
    def __init__(self, data: dict, state_dict):
        from experiments.pytorch_reference import data as tdata
        from experiments.pytorch_reference import models

        self.device = _torch_device()
        self.images, self.labels = data["train_images"], data["train_labels"]
        self.teacher = models.CNN(num_classes=NUM_CLASSES)
        self.teacher.load_state_dict(state_dict)
        self.tdata = tdata
        self._sets = {}

    def datasets(self, preset: str, splits):
        if preset not in self._sets:
            # Converted to float tensors up front (the reference converts per item inside the
            # timed loaders, which is slower): outside the timed region.
            f, s = splits.forget, splits.sample
            self._sets[preset] = (
                self.tdata.tensor_dataset(self.images[f], self.labels[f]),
                self.tdata.tensor_dataset(self.images[s], self.labels[s]),
            )
        return self._sets[preset]

    def run(self, preset: str, splits, epochs: int, seed: int) -> dict:
        from experiments.pytorch_reference import camu

        p = PRESETS[preset]
        unlearn_set, sample_set = self.datasets(preset, splits)
        start = time.perf_counter()
        camu.unlearn(
            self.teacher,
            unlearn_set,
            sample_set,
            num_classes=NUM_CLASSES,
            epochs=epochs,
            kl_lr=p["kl_lr"],
            impair_lr=p["impair_lr"],
            device=self.device,
            seed=seed,
        )
        _sync_torch(self.device)
        return {"s": time.perf_counter() - start}


def _original_weights(seed: int = 0):
    """The same random CNN for both sides (speed does not depend on the weights' values)."""
    import jax

    from camu_jax.convert import flax_to_torch
    from camu_jax.models import create_model
    from camu_jax.steps import init_variables
    from experiments.pytorch_reference import models

    variables = init_variables(
        create_model("cnn", num_classes=NUM_CLASSES), jax.random.key(seed), MNIST_SHAPE
    )
    module = models.CNN(num_classes=NUM_CLASSES)
    flax_to_torch(variables, module)
    return variables, module.state_dict()


def bench_end_to_end(data, variables, state_dict, *, repeats: dict, quick: bool) -> dict:
    """Each JAX run starts from empty compilation caches, so `jax_s` includes compilation as a
    user's first run does; `jax_compile_s` is the compile share, `jax_excl_compile_s` the rest."""
    import jax

    jax_side = JaxEndToEnd(data, variables)
    torch_side = TorchEndToEnd(data, state_dict)
    seeds = iter(range(1000))  # A different seed per JAX run: nothing reused between runs.

    def jax_run(preset, splits, epochs):
        jax.clear_caches()
        return jax_side.run(preset, splits, epochs, next(seeds))

    out = {}
    for preset in ("mnist_class", "mnist_random"):
        splits = make_splits(data["train_labels"], preset)
        epochs = PRESETS[preset]["epochs"]
        if quick and preset == "mnist_random":
            epochs = 1  # --quick: one of the ten epochs
        print(
            f"[benchmark] end_to_end.{preset}: |D_f|={splits.forget.size} epochs={epochs}",
            flush=True,
        )
        times = alternate(
            {
                "jax": functools.partial(jax_run, preset, splits, epochs),
                "torch": functools.partial(torch_side.run, preset, splits, epochs, 0),
            },
            repeats[preset],
        )
        jax_s = [t["s"] for t in times["jax"]]
        torch_s = [t["s"] for t in times["torch"]]
        compile_s = [t["compile_s"] for t in times["jax"]]
        excl = [s - c for s, c in zip(jax_s, compile_s, strict=True)]
        out[preset] = {
            "jax_s": _median(jax_s),
            "torch_s": _median(torch_s),
            "speedup": _median(torch_s) / _median(jax_s),
            "pair_speedups": [t / j for j, t in zip(jax_s, torch_s, strict=True)],
            "jax_compile_s": _median(compile_s),
            "jax_excl_compile_s": _median(excl),
            "speedup_excl_compile": _median(torch_s) / _median(excl),
            "jax_runs_s": jax_s,
            "torch_runs_s": torch_s,
            "forget": int(splits.forget.size),
            "sample": int(splits.sample.size),
            "epochs": epochs,
            "steps": epochs * -(-int(splits.forget.size) // 32),
            "repeats": repeats[preset],
        }
        print(f"[benchmark]   {json.dumps(out[preset])}", flush=True)
    return out


# ----------------------------------------------------------------------------- eval


def bench_eval(data, variables, state_dict, *, repeats: int) -> dict:
    import jax
    import torch

    from camu_jax import sharding
    from camu_jax.data.pipeline import InputSpec
    from camu_jax.evaluation import predict_logits
    from camu_jax.models import create_model
    from experiments.pytorch_reference import data as tdata
    from experiments.pytorch_reference import evaluate, models

    model = create_model("cnn", num_classes=NUM_CLASSES)
    mesh = sharding.make_mesh()
    images = sharding.replicate(data["test_images"], mesh)
    labels = data["test_labels"]
    device = _torch_device()
    module = models.CNN(num_classes=NUM_CLASSES)
    module.load_state_dict(state_dict)
    module.to(device)
    test_set = tdata.tensor_dataset(data["test_images"], labels)

    def jax_eval():
        start = time.perf_counter()
        logits = predict_logits(model, variables, images, spec=InputSpec(), mesh=mesh)
        float(np.mean(logits.argmax(-1) == labels))
        return time.perf_counter() - start

    def torch_eval():
        start = time.perf_counter()
        evaluate.accuracy(module, test_set, batch_size=32, device=device)
        _sync_torch(device)
        return time.perf_counter() - start

    timer = CompileTimer()
    with timer.measure():
        first = jax_eval()
    torch_eval()
    times = alternate({"jax": jax_eval, "torch": torch_eval}, repeats)
    acc_j = float(
        np.mean(
            predict_logits(model, variables, images, spec=InputSpec(), mesh=mesh).argmax(-1)
            == labels
        )
    )
    acc_t = evaluate.accuracy(module, test_set, batch_size=32, device=device) / 100.0
    del jax, torch
    return {
        "jax_s": _median(times["jax"]),
        "torch_s": _median(times["torch"]),
        "speedup": _median(times["torch"]) / _median(times["jax"]),
        "jax_compile_s": timer.total,
        "jax_first_call_s": first,
        "jax_batch": 1024,
        "torch_batch": 32,
        "examples": int(labels.size),
        "accuracy_jax": acc_j,
        "accuracy_torch": acc_t,
        "repeats": repeats,
    }


# ----------------------------------------------------------------------------- memory


def _maxrss_mb() -> float:
    """`ru_maxrss` in MiB. On Linux it can start at the parent's RSS at fork time (kept across
    exec), hence `_peak_rss_mb`."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def _peak_rss_mb() -> float:
    """This process's own peak RSS: `VmHWM` (Linux, reset by exec), else `ru_maxrss`."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return _maxrss_mb()


def _memory_worker(side: str, payload: Path, epochs: int) -> dict:
    arrays = np.load(payload / "data.npz")
    data = {"train_images": arrays["train_images"], "train_labels": arrays["train_labels"]}

    class _Splits:  # Just what the runners read; avoids importing camu_jax in the torch worker.
        forget = arrays["forget"]
        sample = arrays["sample"]

    out = {"side": side}
    if side == "torch":
        import torch

        out["rss_after_import_mb"] = _peak_rss_mb()
        state_dict = torch.load(payload / "cnn.pt")
        TorchEndToEnd(data, state_dict).run("mnist_class", _Splits, epochs, seed=0)
        if torch.cuda.is_available():
            out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        import jax

        from camu_jax.data.splits import Splits
        from camu_jax.models import create_model
        from camu_jax.steps import init_variables

        out["rss_after_import_mb"] = _peak_rss_mb()
        variables = init_variables(
            create_model("cnn", num_classes=NUM_CLASSES), jax.random.key(0), MNIST_SHAPE
        )
        splits = Splits(forget=arrays["forget"], remain=arrays["remain"], sample=arrays["sample"])
        JaxEndToEnd(data, variables).run("mnist_class", splits, epochs, seed=0)
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    out["peak_rss_mb"] = _peak_rss_mb()
    out["ru_maxrss_mb"] = _maxrss_mb()
    return out


def bench_memory(data, epochs: int, torch_threads: int | None = None) -> dict:
    import torch

    splits = make_splits(data["train_labels"], "mnist_class")
    state_dict = _original_weights()[1]
    out = {"preset": "mnist_class", "epochs": epochs}
    with tempfile.TemporaryDirectory(prefix="camu_bench_") as tmp:
        payload = Path(tmp)
        np.savez(
            payload / "data.npz",
            train_images=data["train_images"],
            train_labels=data["train_labels"],
            forget=splits.forget,
            remain=splits.remain,
            sample=splits.sample,
        )
        torch.save(state_dict, payload / "cnn.pt")
        for side in ("jax", "torch"):
            cmd = [
                sys.executable,
                "-m",
                "experiments.benchmark",
                "--memory-worker",
                side,
                "--payload",
                str(payload),
                "--epochs",
                str(epochs),
            ] + (["--torch-threads", str(torch_threads)] if torch_threads else [])
            proc = subprocess.run(
                cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
            )
            if proc.returncode != 0:
                out[side] = {"error": proc.stderr[-2000:]}
                continue
            out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["measure"] = "peak RSS (VmHWM; ru_maxrss too) of a subprocess running only that side" + (
        "; device_peak_mb: peak device memory" if _gpu_present() else ""
    )
    return out


# ----------------------------------------------------------------------------- report


def _fmt(x, spec=".3g"):
    return format(x, spec) if isinstance(x, int | float) else str(x)


def print_table(results: dict) -> None:
    rows = [("benchmark", "jax", "torch", "speedup (jax vs torch)")]
    for key, r in results.get("step", {}).items():
        rows.append(
            (
                f"step.{key} [steps/s]",
                _fmt(r["jax_steps_per_s"]),
                _fmt(r["torch_steps_per_s"]),
                f"{r['speedup']:.2f}x",
            )
        )
        if "jax_teacher_steps_per_s" in r:
            rows.append(
                (
                    "  ... jax with teacher in step",
                    _fmt(r["jax_teacher_steps_per_s"]),
                    "",
                    f"{r['speedup_same_work']:.2f}x",
                )
            )
    for key, r in results.get("end_to_end", {}).items():
        rows.append(
            (
                f"end_to_end.{key} [s] incl. compile ({r['epochs']} ep)",
                _fmt(r["jax_s"]),
                _fmt(r["torch_s"]),
                f"{r['speedup']:.2f}x",
            )
        )
        rows.append(
            (
                "  ... jax excluding compile [s]",
                _fmt(r["jax_excl_compile_s"]),
                "",
                f"{r['speedup_excl_compile']:.2f}x (compile {r['jax_compile_s']:.1f}s)",
            )
        )
    for key, r in results.get("wgrad_chunking", {}).items():
        rows.append(
            (
                f"ablation: chunked wgrad {key} [steps/s]",
                _fmt(r["chunked_steps_per_s"]),
                f"plain {_fmt(r['plain_steps_per_s'])}",
                f"{r['speedup']:.2f}x (chunked vs plain)",
            )
        )
    if "eval" in results:
        r = results["eval"]
        rows.append(
            (
                "eval (10k test images) [s]",
                _fmt(r["jax_s"]),
                _fmt(r["torch_s"]),
                f"{r['speedup']:.2f}x",
            )
        )
    if "memory" in results:
        r = results["memory"]
        j, t = r.get("jax", {}), r.get("torch", {})
        rows.append(
            (
                "memory peak RSS [MiB]",
                _fmt(j.get("peak_rss_mb", "err")),
                _fmt(t.get("peak_rss_mb", "err")),
                "",
            )
        )
        if "device_peak_mb" in j or "device_peak_mb" in t:
            rows.append(
                (
                    "memory peak device [MiB]",
                    _fmt(j.get("device_peak_mb", "-")),
                    _fmt(t.get("device_peak_mb", "-")),
                    "",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    d = results["device"]
    print(
        f"\njax {d['jax_device']} x{d['jax_device_count']}; torch {d['torch_device']} "
        f"({d['torch_device_name']}, {d['torch_threads']} threads); data: {results['data']}"
    )


# ----------------------------------------------------------------------------- main


def step_configs(quick: bool, gpu: bool) -> list[tuple]:
    """(key, model, input shape, batch, steps per repeat, repeats, warmup, teacher variant)."""
    if gpu:
        return [
            ("cnn_b32", "cnn", MNIST_SHAPE, 32, 200, 5, 20, True),
            ("cnn_b256", "cnn", MNIST_SHAPE, 256, 100, 5, 10, True),
            ("resnet18_cifar_b32", "resnet18_cifar", (32, 32, 3), 32, 50, 5, 5, True),
            ("resnet18_cifar_b128", "resnet18_cifar", (32, 32, 3), 128, 20, 5, 3, True),
            ("resnet18_224_b32", "resnet18", (224, 224, 3), 32, 10, 5, 2, True),
        ]
    if quick:  # ResNet18 at batch 128 takes minutes per step on a small CPU: skipped.
        return [
            ("cnn_b32", "cnn", MNIST_SHAPE, 32, 20, 3, 3, True),
            ("cnn_b256", "cnn", MNIST_SHAPE, 256, 3, 3, 1, True),
            ("resnet18_cifar_b32", "resnet18_cifar", (32, 32, 3), 32, 1, 1, 0, False),
        ]
    return [
        ("cnn_b32", "cnn", MNIST_SHAPE, 32, 50, 5, 5, True),
        ("cnn_b256", "cnn", MNIST_SHAPE, 256, 10, 5, 2, True),
        ("resnet18_cifar_b32", "resnet18_cifar", (32, 32, 3), 32, 2, 3, 1, False),
        ("resnet18_cifar_b128", "resnet18_cifar", (32, 32, 3), 128, 1, 3, 1, False),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="a few minutes, synthetic data")
    parser.add_argument(
        "--mnist-dir",
        type=Path,
        default=DEFAULT_MNIST_DIR,
        help="MNIST IDX files (default: ../shared/data/mnist)",
    )
    parser.add_argument(
        "--only",
        default="step,end_to_end,eval,memory",
        help="comma-separated subset of step,end_to_end,eval,memory,wgrad_chunking (the last, an "
        "ablation of the CPU weight-gradient chunking, runs only when named)",
    )
    parser.add_argument(
        "--steps",
        default=None,
        help="comma-separated subset of the step benchmarks (e.g. cnn_b32,cnn_b256; default all)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the PyTorch side (default: PyTorch's own choice)",
    )
    parser.add_argument("--memory-worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--payload", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.memory_worker:
        print(json.dumps(_memory_worker(args.memory_worker, args.payload, args.epochs)))
        return 0
    if args.out is None:
        parser.error("--out is required")
    from camu_jax.reporting import atomic_write_bytes

    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(
            f"[benchmark] warning: load average {load:.1f} on {os.cpu_count()} CPUs; other "
            "processes distort the timings (PyTorch's OpenMP threads suffer most)",
            flush=True,
        )

    sections = set(args.only.split(","))
    data = load_mnist(args.mnist_dir, synthetic=args.quick)
    memory = None
    if "memory" in sections:
        # First, while this process is small: a forked child's ru_maxrss starts at its size.
        print("[benchmark] memory ...", flush=True)
        memory = bench_memory(
            data,
            epochs=1 if args.quick else PRESETS["mnist_class"]["epochs"],
            torch_threads=args.torch_threads,
        )
    results = environment()
    results["quick"] = args.quick
    results["data"] = data["data"]
    gpu = _gpu_present()
    started = time.perf_counter()

    if "step" in sections:
        results["step"] = {}
        configs = step_configs(args.quick, gpu)
        if args.steps:
            wanted = set(args.steps.split(","))
            unknown = wanted - {c[0] for c in configs}
            if unknown:
                parser.error(f"--steps: unknown {sorted(unknown)}; have {[c[0] for c in configs]}")
            configs = [c for c in configs if c[0] in wanted]
        for key, name, shape, batch, steps, repeats, warmup, teacher in configs:
            print(f"[benchmark] step.{key} ...", flush=True)
            results["step"][key] = bench_step(
                name, shape, batch, steps=steps, repeats=repeats, warmup=warmup, teacher=teacher
            )
            print(f"[benchmark]   {json.dumps(results['step'][key])}", flush=True)

    variables, state_dict = _original_weights()
    if "end_to_end" in sections:
        repeats = (
            {"mnist_class": 1, "mnist_random": 1}
            if args.quick
            else {"mnist_class": 3, "mnist_random": 2}
        )
        results["end_to_end"] = bench_end_to_end(
            data, variables, state_dict, repeats=repeats, quick=args.quick
        )
    if "wgrad_chunking" in sections:
        print("[benchmark] wgrad_chunking ...", flush=True)
        configs = [("cnn_b32", "cnn", MNIST_SHAPE, 32, 5 if args.quick else 50)]
        if not args.quick:
            configs.append(("resnet18_cifar_b32", "resnet18_cifar", (32, 32, 3), 32, 1))
        results["wgrad_chunking"] = bench_wgrad_chunking(configs, repeats=3 if args.quick else 5)
    if "eval" in sections:
        print("[benchmark] eval ...", flush=True)
        results["eval"] = bench_eval(data, variables, state_dict, repeats=3 if args.quick else 5)
    if memory is not None:
        results["memory"] = memory

    results["device"]["loadavg_end"] = list(os.getloadavg())
    results["total_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, (json.dumps(results, indent=2) + "\n").encode())
    print()
    print_table(results)
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
