"""What `pip install` puts into site-packages: the library only. `experiments/` holds the
repository's scripts (`python -m experiments.unlearn` from the repository root); installed, a
top-level package named as generically as `experiments` would shadow, or be shadowed by,
another project's."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_the_library_and_nothing_else(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "requirements.txt", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("camu_jax", "experiments"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"camu_jax", wheel.name.split("-py3")[0] + ".dist-info"}, top
    # Every library module is in it (the scripts' imports of it then work installed).
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "camu_jax").rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))
