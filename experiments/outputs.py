"""Where a study writes, checked before any data is loaded or model trained, so that a path in
the way fails in seconds, naming it, instead of as a traceback after the whole run.

A folder the study writes into must be a folder (or not exist yet), a result file must not be
a folder, a checkpoint folder of this dataset and model must not have been replaced by a file,
and the deepest file Orbax writes below the checkpoint folders must fit the system's path
length limit.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

REPORT_FILES = (
    "results.json",
    "results.csv",
    "results.md",
    "per_class_accuracy.png",
    "relearning.png",
)
# What Orbax adds below a checkpoint folder: `<step>.orbax-checkpoint-tmp-<ns timestamp>/state/
# ocdbt.process_0/d/<32 hex>` measures about 100 characters; the rest is room for its other
# temporary names.
ORBAX_DEPTH = 200
# A checkpoint folder name beyond the run's name: `-seed<s>-ep<n>-split<12 hex>-<8 hex>`.
NAME_EXTRA = 64


def check_output_paths(
    workdir: Path,
    checkpoint_root: Path,
    kinds: Iterable[str],
    prefix: str,
    run_names: Iterable[str],
) -> None:
    """Raises ValueError naming the first path in the way.

    Args:
      workdir: where results.json, the reports and `splits/<run>.npz` go.
      checkpoint_root: where `<kind>/<prefix>...` checkpoint folders go, one kind per model
        kind (original, retrain, each method).
      prefix: the start of this study's checkpoint folder names (`<dataset>-<model>-`).
      run_names: the study's run names (in split file and checkpoint folder names).
    """
    workdir, root, kinds, run_names = (
        Path(workdir),
        Path(checkpoint_root),
        list(kinds),
        list(run_names),
    )
    for folder in (workdir, workdir / "splits", root, *(root / k for k in kinds)):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder} is a file, not a directory; the run writes into it")
    files = [workdir / f for f in REPORT_FILES]
    files += [workdir / "splits" / f"{name}.npz" for name in run_names]
    for path in files:
        if path.exists() and not path.is_file():
            raise ValueError(f"{path} is a directory, not a file; the run writes this file")
    for kind in kinds:
        if (root / kind).is_dir():
            for entry in os.scandir(root / kind):
                if entry.name.startswith(prefix) and not entry.is_dir():
                    raise ValueError(
                        f"{entry.path} is a file where a checkpoint folder belongs; delete it"
                    )
    _check_length(root, kinds, prefix, run_names)


def _check_length(root: Path, kinds: list[str], prefix: str, run_names: list[str]) -> None:
    root = root.absolute()
    existing = root
    while not existing.exists():
        existing = existing.parent
    path_max = _pathconf(existing, "PC_PATH_MAX", 4096)
    name_max = _pathconf(existing, "PC_NAME_MAX", 255)
    name = len(prefix) + max([len(n) for n in run_names] + [0]) + NAME_EXTRA
    if name > name_max:
        raise ValueError(
            f"checkpoint folder names under {root} would be up to {name} characters long, "
            f"beyond this file system's limit of {name_max}"
        )
    deepest = len(str(root)) + 1 + max([len(k) for k in kinds] + [0]) + 1 + name + ORBAX_DEPTH
    if deepest >= path_max:
        raise ValueError(
            f"{root} is too long ({len(str(root))} characters): Orbax writes paths of up to "
            f"{deepest} characters below it, beyond this system's limit of {path_max - 1}; "
            "choose a shorter --workdir or --checkpoint-dir"
        )


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default


def os_error_line(error: OSError) -> str:
    """One line naming the path(s) and the OS error: `<path>: <what happened>`."""
    what = error.strerror or (errno.errorcode.get(error.errno) if error.errno else None)
    what = " ".join(str(what or error).split())
    if error.filename is None:
        return what
    where = str(error.filename)
    if error.filename2 is not None:
        where = f"{where} -> {error.filename2}"
    return f"{where}: {what}"
