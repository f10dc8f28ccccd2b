"""The reference's "time": from the start of counterfactual construction to the end of the last
unlearning epoch, MNIST shapes, the reference's presets.

JAX: the library's `camu_jax.methods.camu.unlearn` (a population of one). PyTorch:
`pytorch_reference.camu.unlearn` (DataLoaders at batch 32, counterfactuals built in a Python
pass, teacher recomputed every step). Each JAX run starts from empty in-memory compilation
caches (and no persistent cache), so its seconds include compilation, as a user's first run
does; `jax_compile_s` is the compile share.
"""

from __future__ import annotations

import functools
import json
import time

from .data import NUM_CLASSES, PRESETS, make_splits
from .env import sync_torch, torch_device
from .timing import CompileTimer, alternate, median


class JaxEndToEnd:
    def __init__(self, data: dict, variables: dict):
        import jax

        from camu_jax import sharding
        from camu_jax.data.pipeline import DeviceData, InputSpec
        from camu_jax.models import create_model

        self.jax = jax
        self.model = create_model("cnn", num_classes=NUM_CLASSES)
        self.data = DeviceData.put(
            data["train_images"], data["train_labels"], spec=InputSpec(), mesh=sharding.make_mesh()
        )
        self.variables = variables
        self.timer = CompileTimer()

    def run(self, preset: str, splits, epochs: int, seed: int) -> dict:
        from camu_jax.methods.camu import CamuConfig, unlearn

        p = PRESETS[preset]
        config = CamuConfig(epochs=epochs, kl_lr=p["kl_lr"], impair_lr=p["impair_lr"])
        with self.timer.measure():
            start = time.perf_counter()
            variables, _ = unlearn(
                self.model,
                self.variables,
                data=self.data,
                splits=splits,
                num_classes=NUM_CLASSES,
                config=config,
                seed=seed,
                progress=False,
            )
            self.jax.block_until_ready(variables)
            wall = time.perf_counter() - start
        return {"s": wall, "compile_s": self.timer.total}


class TorchEndToEnd:
    def __init__(self, data: dict, state_dict):
        from ..pytorch_reference import data as tdata
        from ..pytorch_reference import models

        self.device = torch_device()
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
        from ..pytorch_reference import camu

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
        sync_torch(self.device)
        return {"s": time.perf_counter() - start}


def bench_end_to_end(data, variables, state_dict, *, repeats: dict, quick: bool) -> dict:
    """Both presets, JAX and PyTorch alternated; `jax_s` includes compilation,
    `jax_excl_compile_s` is the rest."""
    import jax

    jax_side = JaxEndToEnd(data, variables)
    torch_side = TorchEndToEnd(data, state_dict)
    seeds = iter(range(1000))  # A different seed per JAX run: nothing reused between runs.

    def jax_run(preset, splits, epochs):
        # Also empties the jitted functions of the library's memoised engines: every run
        # traces and compiles anew (its compile_s is as large as the first run's).
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
            "jax_s": median(jax_s),
            "torch_s": median(torch_s),
            "speedup": median(torch_s) / median(jax_s),
            "pair_speedups": [t / j for j, t in zip(jax_s, torch_s, strict=True)],
            "jax_compile_s": median(compile_s),
            "jax_excl_compile_s": median(excl),
            "speedup_excl_compile": median(torch_s) / median(excl),
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
