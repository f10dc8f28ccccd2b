"""One CaMU double step (step A + step B) on a fixed random batch, JAX against PyTorch.

JAX: `camu_step` jitted with the state donated and the teacher's embeddings passed in (the
library computes them once per run); `with_teacher=True` also recomputes the two teacher
passes inside the step, as the reference does (the same work as the PyTorch step). PyTorch:
the reference's step (`pytorch_reference.camu.camu_step`) on device tensors.
"""

from __future__ import annotations

import copy
import functools
import json
import time

import numpy as np

from .data import MNIST_SHAPE, NUM_CLASSES
from .env import sync_torch, torch_device
from .timing import CompileTimer, alternate, median

STEP_LRS = {"kl_lr": 4e-4, "impair_lr": 1e-3}  # the reference's MNIST class preset


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

        from camu_jax.methods.camu import camu_step, init_camu_state
        from camu_jax.models import apply_model, create_model, init_variables
        from camu_jax.steps import adam_l2

        model = create_model(name, num_classes=NUM_CLASSES)
        self.teacher = init_variables(model, jax.random.key(seed), shape)
        kl_tx, ce_tx = adam_l2(STEP_LRS["kl_lr"]), adam_l2(STEP_LRS["impair_lr"])
        self.state = init_camu_state(self.teacher, kl_tx, ce_tx)
        step = functools.partial(camu_step, model=model, kl_tx=kl_tx, ce_tx=ce_tx)
        host = _random_camu_batch(np.random.default_rng(seed), batch, shape)
        mask = jnp.ones((batch,), jnp.float32)

        def embed(teacher, x):
            return apply_model(model, teacher["params"], teacher["batch_stats"], x, train=False)[1]

        if with_teacher:

            def full(state, teacher, b):
                b = dict(b, z0_s=embed(teacher, b["x_s"]), z0_cf=embed(teacher, b["x_cf"]))
                del b["x_cf"]
                return step(state, b)

            self.batch = jax.device_put({**host, "mask_f": mask, "mask_s": mask})
            fn = jax.jit(full, donate_argnums=0)
            self.call = lambda state: fn(state, self.teacher, self.batch)
        else:
            jembed = jax.jit(embed)
            b = {k: v for k, v in host.items() if k != "x_cf"}
            b.update(
                z0_s=jembed(self.teacher, host["x_s"]), z0_cf=jembed(self.teacher, host["x_cf"])
            )
            self.batch = jax.device_put({**b, "mask_f": mask, "mask_s": mask})
            fn = jax.jit(step, donate_argnums=0)
            self.call = lambda state: fn(state, self.batch)
        timer = CompileTimer()
        start = time.perf_counter()
        with timer.measure():
            self.state, _ = self.call(self.state)
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

        from ..pytorch_reference import camu, models
        from ..pytorch_reference.data import to_tensor

        self.device = torch_device()
        torch.manual_seed(seed)
        self.teacher = models.create_model(name, num_classes=NUM_CLASSES).to(self.device)
        self.new = copy.deepcopy(self.teacher)
        self.teacher.eval()
        self.new.train()
        self.opt1, self.opt2 = camu.make_optimizers(self.new, **STEP_LRS)
        host = _random_camu_batch(np.random.default_rng(seed), batch, shape)
        x = {k: to_tensor(host[k]).to(self.device) for k in ("x_f", "x_cf", "x_s")}
        y = {k: torch.from_numpy(host[k]).long().to(self.device) for k in ("y_cf", "y_s")}
        self.args = (x["x_f"], x["x_cf"], y["y_cf"], x["x_s"], y["y_s"])
        self._step = camu.camu_step

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self._step(self.teacher, self.new, self.opt1, self.opt2, *self.args)
        sync_torch(self.device)
        return time.perf_counter() - start


def bench_step(name, shape, batch, *, steps: int, repeats: int, warmup: int, teacher: bool):
    """Steps per second after warm-up, medians over `repeats` A/B rounds of `steps` steps."""
    sides = {"jax": JaxStepRunner(name, shape, batch, with_teacher=False)}
    compile_s = {
        "jax_compile_s": sides["jax"].compile_s,
        "jax_first_call_s": sides["jax"].first_call_s,
    }
    if teacher:
        sides["jax_teacher"] = JaxStepRunner(name, shape, batch, with_teacher=True)
        compile_s["jax_teacher_compile_s"] = sides["jax_teacher"].compile_s
    sides["torch"] = TorchStepRunner(name, shape, batch)
    for side in sides.values():
        if warmup:
            side.run(warmup)
    times = alternate({k: functools.partial(v.run, steps) for k, v in sides.items()}, repeats)
    rate = {k: [steps / s for s in v] for k, v in times.items()}
    out = {
        "jax_steps_per_s": median(rate["jax"]),
        "torch_steps_per_s": median(rate["torch"]),
        "speedup": median(rate["jax"]) / median(rate["torch"]),
        "pair_speedups": [j / t for j, t in zip(rate["jax"], rate["torch"], strict=True)],
        "steps_per_repeat": steps,
        "repeats": repeats,
        "batch": batch,
        "input_shape": list(shape),
        **compile_s,
    }
    if teacher:
        out["jax_teacher_steps_per_s"] = median(rate["jax_teacher"])
        out["speedup_same_work"] = median(rate["jax_teacher"]) / median(rate["torch"])
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
                "plain_steps_per_s": median(rate["plain"]),
                "chunked_steps_per_s": median(rate["chunked"]),
                "speedup": median(rate["chunked"]) / median(rate["plain"]),
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
