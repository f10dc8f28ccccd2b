"""Peak memory of each side, run alone in its own subprocess on the class preset.

CPU: peak RSS (`VmHWM`, and `ru_maxrss`); GPU: peak device bytes as well. The worker is this
package's CLI with `--memory-worker jax|torch`; it prints one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .data import MNIST_SHAPE, NUM_CLASSES, ROOT, make_splits, original_weights
from .env import gpu_present


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


def memory_worker(side: str, payload: Path, epochs: int) -> dict:
    """Runs one side's class preset on the payload's data; returns its peak memory."""
    arrays = np.load(payload / "data.npz")
    data = {"train_images": arrays["train_images"], "train_labels": arrays["train_labels"]}
    out = {"side": side}
    if side == "torch":
        import torch

        from .end_to_end import TorchEndToEnd

        class _Splits:  # What the runner reads; avoids importing camu_jax in the torch worker.
            forget = arrays["forget"]
            sample = arrays["sample"]

        out["rss_after_import_mb"] = _peak_rss_mb()
        # Tensors only: a payload file must not be able to run code when loaded.
        state_dict = torch.load(payload / "cnn.pt", weights_only=True)
        TorchEndToEnd(data, state_dict).run("mnist_class", _Splits, epochs, seed=0)
        if torch.cuda.is_available():
            out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        import jax

        from camu_jax.data.splits import Splits
        from camu_jax.models import create_model, init_variables

        from .end_to_end import JaxEndToEnd

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
    state_dict = original_weights()[1]
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
                __package__,
                "--memory-worker",
                side,
                "--payload",
                str(payload),
                "--epochs",
                str(epochs),
            ] + (["--torch-threads", str(torch_threads)] if torch_threads else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                out[side] = {"error": proc.stderr[-2000:]}
                continue
            out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["measure"] = "peak RSS (VmHWM; ru_maxrss too) of a subprocess running only that side" + (
        "; device_peak_mb: peak device memory" if gpu_present() else ""
    )
    return out
