"""The package layout, the one part of the build that pyproject.toml (everything else) cannot
state without listing every subpackage: the library, `camu_jax`, and the scripts of
`experiments/` as its subpackage `camu_jax.experiments`. They import each other relatively, so
the same files run as `python -m experiments.unlearn` from a checkout and as `camu-jax unlearn`
installed; a top-level package named as generically as `experiments` in site-packages would
shadow, or be shadowed by, another project's."""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["camu_jax", "camu_jax.*"]),
        *("camu_jax." + name for name in find_packages(include=["experiments", "experiments.*"])),
    ],
    package_dir={"camu_jax.experiments": "experiments"},
)
