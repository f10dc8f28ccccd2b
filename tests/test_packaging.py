"""What `pip install` puts into site-packages, and what it takes to get there.

The sdist and the wheel are built offline as `python -m build` builds them (the wheel from the
sdist, so a file the sdist lacks is missing from the wheel too). They hold the library,
`camu_jax`, and the scripts of `experiments/` as its subpackage `camu_jax.experiments`:
installed, a top-level package named as generically as `experiments` would shadow, or be
shadowed by, another project's. The sdist installs in a fresh environment and its `camu-jax`
command runs there, outside the checkout. The dependencies pyproject.toml declares are the
third-party packages the code imports, and the constraints files pin each of them.
"""

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# What a clean checkout holds that the build reads.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "camu_jax", "experiments")
PACKAGE_DIRS = ("camu_jax", "experiments")
COMMANDS = ("unlearn", "report", "tune", "benchmark")
# Declared but not imported, and why.
NOT_IMPORTED = {
    # The file format of the TFDS builders (`file_format="array_record"`), which TFDS
    # requires on Linux only.
    "array-record",
}
# Only the PyTorch port of the reference and the benchmarks import torch (the `torch` extra).
TORCH_USERS = ("experiments/pytorch_reference", "experiments/benchmark")


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def sources(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def installed_path(source: Path) -> str:
    """Where a source file lies in site-packages: experiments/x.py -> camu_jax/experiments/x.py."""
    rel = source.relative_to(ROOT).as_posix()
    return "camu_jax/" + rel if rel.startswith("experiments/") else rel


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The sdist and the wheel, built offline from a copy of the checkout's build inputs."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("the `build` package is missing (pip install -e '.[dev]')")
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy(ROOT / name, src / name)
    out = tmp / "dist"
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)])
    return out


def test_the_wheel_holds_the_library_and_its_scripts(dist):
    (wheel,) = dist.glob("*.whl")
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    info = wheel.name.split("-py3")[0] + ".dist-info"
    assert {n.split("/")[0] for n in names} == {"camu_jax", info}
    # Every module of the library and of the scripts, at its installed path, and no other.
    expected = {installed_path(p) for folder in PACKAGE_DIRS for p in sources(folder)}
    assert {n for n in names if n.endswith(".py")} == expected
    entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert re.search(r"^camu-jax = camu_jax\.experiments\.__main__:main$", entry_points, re.M)
    meta = archive.read(f"{info}/METADATA").decode()
    import camu_jax

    assert f"\nVersion: {camu_jax.__version__}\n" in meta


def test_the_sdist_holds_every_build_input(dist):
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {"pyproject.toml", "README.md"}
    expected |= {
        p.relative_to(ROOT).as_posix() for f in ("camu_jax", "experiments") for p in sources(f)
    }
    assert expected <= names, sorted(expected - names)


def fresh_venv(path: Path) -> Path:
    """A new virtual environment that sees this one's packages (through a .pth file: a venv's
    `--system-site-packages` means the base interpreter's, not this venv's) but not the
    checkout; its python."""
    run([sys.executable, "-m", "venv", "--without-pip", str(path)])
    python = path / "bin" / "python"
    own = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    parent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(own.stdout.strip(), "parent-environment.pth").write_text("\n".join(sorted(parent)) + "\n")
    return python


def test_the_sdist_installs_and_its_command_runs_outside_the_checkout(dist, tmp_path):
    (sdist,) = dist.glob("*.tar.gz")
    python = fresh_venv(tmp_path / "venv")
    # Offline: every dependency must already be here, and the build needs no download.
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index"]
    run([*pip, "--no-build-isolation", str(sdist)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    work = tmp_path / "elsewhere"  # not the checkout: its camu_jax/ and experiments/ are not found
    work.mkdir()
    probe = """
import importlib.util, json
from importlib import metadata
import camu_jax
eps = [ep for ep in metadata.distribution("camu-jax").entry_points if ep.group == "console_scripts"]
print(json.dumps({
    "camu_jax": camu_jax.__file__,
    "experiments": importlib.util.find_spec("experiments") is not None,
    "scripts": {ep.name: ep.load().__module__ for ep in eps},
}))
"""
    found = json.loads(run([str(python), "-c", probe], cwd=work, env=env).stdout)
    assert Path(found["camu_jax"]).is_relative_to(tmp_path / "venv"), found
    assert not found["experiments"], "a top-level `experiments` package was installed"
    assert found["scripts"] == {"camu-jax": "camu_jax.experiments.__main__"}
    camu = str(tmp_path / "venv" / "bin" / "camu-jax")
    listed = run([camu, "--help"], cwd=work, env=env).stdout
    assert all(f"camu-jax {command}" in listed for command in COMMANDS), listed
    # A smoke test that needs no training: the reports of a recorded run, rebuilt.
    shutil.copy(ROOT / "tests" / "fixtures" / "results_small.json", work / "results.json")
    written = run([camu, "report", str(work)], cwd=work, env=env).stdout.split()
    assert str(work / "results.md") in written and (work / "results.md").is_file()


def test_the_command_dispatches_to_the_scripts(capsys, tmp_path):
    from experiments.__main__ import COMMANDS as dispatched
    from experiments.__main__ import USAGE, main

    assert tuple(dispatched) == COMMANDS
    assert USAGE.startswith(f"usage: camu-jax {{{','.join(COMMANDS)}}}")
    assert all(f"\n    camu-jax {command} " in USAGE for command in COMMANDS)
    for command in COMMANDS:
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0
        assert "usage:" in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 2  # the script's own error: no results.json
    assert "results file not found" in capsys.readouterr().err
    assert main(["unlearned"]) == 2 and "unknown command 'unlearned'" in capsys.readouterr().err
    assert main([]) == 2 and "usage: camu-jax" in capsys.readouterr().err


def absolute_imports(path):
    """`(node, [module names])` of each absolute import statement in the file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield node, [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node, [node.module]


def test_the_scripts_import_each_other_relatively():
    """`from .configs import ...`, never `from experiments.configs import ...`: installed, the
    package is `camu_jax.experiments` and no `experiments` exists. The library never imports
    the scripts."""
    absolute = []
    for folder in PACKAGE_DIRS:
        for path in sources(folder):
            for node, names in absolute_imports(path):
                if any(re.match(r"(camu_jax\.)?experiments(\.|$)", n) for n in names):
                    absolute.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not absolute, f"absolute imports of the scripts: {absolute}"


def third_party_imports(*folders: str) -> dict[str, set[str]]:
    """`{top-level module: files importing it}` of the absolute imports outside the standard
    library and the project (relative imports are the project's own)."""
    own = {"camu_jax", "experiments"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in sources(folder):
            for _, names in absolute_imports(path):
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in own:
                        found.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalise(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in requirements}


def distribution(module: str) -> str:
    """The installed distribution that provides a top-level module (the module's own name for
    one not installed here, as torch where its CPU build does not exist)."""
    names = metadata.packages_distributions().get(module, [module])
    return normalise(names[0])


def test_declared_dependencies_are_what_the_code_imports():
    runtime = requirement_names(PROJECT["dependencies"])
    extras = {k: requirement_names(v) for k, v in PROJECT["optional-dependencies"].items()}
    imported = set()
    for module, files in third_party_imports(*PACKAGE_DIRS).items():
        dist = distribution(module)
        imported.add(dist)
        if dist in extras["torch"]:
            assert all(f.startswith(TORCH_USERS) for f in files), (module, sorted(files))
        else:
            assert dist in runtime, f"{sorted(files)} import {module} ({dist}): not declared"
    assert runtime - imported == NOT_IMPORTED, "declared but imported nowhere"
    # Whatever only the tests import is in the dev extra (chex, pillow...), never a run-time
    # dependency that the library does not need.
    for module, files in third_party_imports("tests").items():
        dist = distribution(module)
        assert dist in runtime | extras["dev"] | extras["torch"], (module, sorted(files))
    assert not (extras["dev"] & runtime)


@pytest.mark.parametrize("constraints", ["constraints-py311.txt", "constraints-py312.txt"])
def test_constraints_pin_every_dependency_within_what_is_declared(constraints):
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / constraints).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[normalise(name)] = version.strip()
    declared = PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"]
    if constraints == "constraints-py311.txt":  # torch's CPU build exists for 3.11 only
        declared += PROJECT["optional-dependencies"]["torch"]
    for text in declared:
        requirement = Requirement(text)
        name = normalise(requirement.name)
        assert name in pins, f"{constraints} does not pin {name}"
        assert requirement.specifier.contains(pins[name]), (constraints, text, pins[name])
