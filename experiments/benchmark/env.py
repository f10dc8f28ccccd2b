"""The machine and the software versions a benchmark ran on."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_present() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def sync_torch(device: str) -> None:
    """Waits for queued CUDA work, so a timer stops after it, not when it was queued."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def cpu_model() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment() -> dict:
    """`{'device': ..., 'versions': ...}` of this process (JAX's default backend, PyTorch's)."""
    import jax
    import torch

    from camu_jax.versions import versions

    jax_dev = jax.devices()[0]
    cuda = torch.cuda.is_available()
    return {
        "device": {
            "jax_backend": jax.default_backend(),
            "jax_device": f"{jax_dev.platform}:{getattr(jax_dev, 'device_kind', '')}",
            "jax_device_count": jax.device_count(),
            "torch_device": torch_device(),
            "torch_device_name": torch.cuda.get_device_name(0) if cuda else cpu_model(),
            "torch_device_count": torch.cuda.device_count() if cuda else 0,
            "torch_threads": torch.get_num_threads(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": list(os.getloadavg()),
        },
        # results.json's (python, platform, processor, jax, jaxlib, flax...) and PyTorch's.
        "versions": {**versions(), "torch": torch.__version__},
    }


def load_warning() -> str | None:
    """A warning when other processes keep the CPUs busy (half of them or more): they distort
    the timings, PyTorch's OpenMP threads most."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cpus:
        return (
            f"load average {load:.1f} on {cpus} CPUs; other processes distort the timings "
            "(PyTorch's OpenMP threads suffer most)"
        )
    return None
