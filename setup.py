"""camu-jax: Causal Machine Unlearning (CaMU, Shen et al., SDM 2024) in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
REQUIREMENTS = [
    line.strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="camu-jax",
    version="0.2.0",
    description="Fast, faithful JAX/Flax reimplementation of CaMU (Causal Machine Unlearning).",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    # Only the library: `experiments/` holds the repository's scripts (`python -m
    # experiments.unlearn` from the repository root), not a package for site-packages, where
    # a top-level name as generic as `experiments` would shadow or be shadowed by others.
    packages=find_packages(include=["camu_jax", "camu_jax.*"]),
    install_requires=REQUIREMENTS,
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6"],
        # The PyTorch port of the reference (benchmarks and parity tests). On a CPU-only
        # machine install the CPU build first: `pip install torch==2.13.0 --index-url
        # https://download.pytorch.org/whl/cpu` (plain PyPI serves Linux the CUDA builds).
        "torch": ["torch>=2.4"],
    },
)
