"""What a result's numbers depend on besides the seed: the versions that results.json records.

XLA compiles the models' arithmetic (jax, jaxlib) for the host's vector instructions (the
processor), flax and optax define the layers and updates, and numpy, scipy, scikit-learn and
xgboost fit the membership attacks; another version of any of them may move the last digits
of a metric (README, "The main job prints"). `tests/test_readme.py` compares the README's table
exactly only where these versions are the ones its constraints file pins.
"""

from __future__ import annotations

import platform
from importlib import metadata

# The distributions whose versions move numbers, by their names on the package index.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "scipy", "scikit-learn", "xgboost")


def processor() -> str:
    """The processor's model name (/proc/cpuinfo on Linux; `platform.processor()` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def versions() -> dict[str, str | None]:
    """`{"python", "platform", "processor", *PACKAGES}` of this process: versions as
    installed (None for a package that is not), the platform as `platform.platform()`."""
    found: dict[str, str | None] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": processor(),
    }
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
