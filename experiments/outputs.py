"""Where a study writes, checked before any data is loaded or model trained, so that a path in
the way fails in seconds, naming it, instead of as a traceback after the whole run.

A folder the study writes into must be a folder (or not exist yet), a result file must not be
a folder, a checkpoint folder of this dataset and model must not have been replaced by a file,
and the deepest file Orbax writes below the checkpoint folders must fit the system's path
length limit.

Which study a work dir holds: `study_settings` are the settings that change a study's results;
the default work dir is named after them (`default_workdir`: `runs/<dataset>-<forget set>-<hash
of the settings>`), so that a study with other settings never writes over another's results,
and `check_workdir_study` refuses a work dir whose results.json records other settings, naming
them.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

REPORT_FILES = (
    "results.json",
    "results.csv",
    "results.md",
    *(
        f"{stem}.{fmt}"
        for stem in ("per_class_accuracy", "relearning")
        for fmt in ("png", "pdf", "svg")
    ),
)
# The step logs' folder in a work dir: `<workdir>/logs/<phase>/<member>/` (`camu_jax.logs`).
LOGS = "logs"
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
      workdir: where results.json, the reports, `splits/<run>.npz` and the step logs
        (`logs/`) go.
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
    for folder in (workdir, workdir / "splits", workdir / LOGS, root, *(root / k for k in kinds)):
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


# -- which study a work dir holds ---------------------------------------------------------------

# `ExperimentConfig` fields that do not change a study's results: where files go, how the work
# is spread over devices and processes (the values do not depend on it), how it is shown, and
# what a divergence does (`stop` writes no results). `camu`, `method_settings` and `methods`
# are compared as what they resolve to: every row's method config.
NOT_RESULT_SETTINGS = frozenset(
    {
        "workdir",
        "checkpoint_dir",
        "checkpoint_every",
        "data_dir",
        "manual_dir",
        "progress",
        "population_size",
        "compile_ahead",
        "eval_workers",
        "on_divergence",
        "camu",
        "method_settings",
        "methods",
    }
)
# The forget set of each scenario; the other scenarios' settings are not used.
FORGET_SETTINGS = {
    "class": "forget_classes",
    "random": "forget_fraction",
    "proportions": "forget_proportions",
    "indices": "forget_indices",
}
DEFAULT_ROOT = Path("runs")  # default work dirs, and their shared checkpoint folder


def _flat(settings: Mapping) -> dict:
    """A method config's fields, nested configs flat (CaMU's coefficients), as `--set` names
    them."""
    out = {}
    for key, value in settings.items():
        out.update(_flat(value) if isinstance(value, Mapping) else {key: value})
    return out


def study_settings(config: Mapping, method_configs: Mapping[str, Mapping]) -> dict:
    """The settings that change a study's results, in the form results.json records them:
    `{"study": {field: value}, "methods": {row label: {setting: value}}}`.

    `config` is the study's config as results.json's `config` holds it, less
    NOT_RESULT_SETTINGS, the other scenarios' forget settings and `relearn_every` without
    relearning; `method_configs` is results.json's `method_configs` (every row's config).
    Values are JSON's (tuples as lists), so a config and a record of it compare equal."""
    scenario = config.get("scenario")
    skip = NOT_RESULT_SETTINGS | {f for s, f in FORGET_SETTINGS.items() if s != scenario}
    if config.get("relearn") is False:
        skip |= {"relearn_every"}
    study = {k: v for k, v in config.items() if k not in skip}
    methods = {
        label: _flat(values)
        for label, values in method_configs.items()
        if isinstance(values, Mapping)
    }
    return json.loads(json.dumps({"study": study, "methods": methods}, default=str))


def settings_of(config) -> dict:
    """`study_settings` of an `experiments.configs.ExperimentConfig`: what its results.json
    will record."""
    record = dataclasses.asdict(dataclasses.replace(config, camu=config.camu_config()))
    rows = {label: dataclasses.asdict(c) for label, c in config.method_configs().items()}
    return study_settings(record, rows)


def settings_hash(settings: dict) -> str:
    """A short hash of `study_settings`."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _forget_name(config) -> str:
    """The forget set in a folder name: `class0`, `class0+1` (forgotten together),
    `class0_1` (one run each), `class-all`, `random10` (percent), `proportions`, `indices500`."""
    if config.scenario == "class":
        groups = config.forget_classes
        if sorted(groups) == [(c,) for c in range(config.num_classes)]:
            return "class-all"
        name = "class" + "_".join("+".join(map(str, g)) for g in groups)
        return name if len(name) <= 24 else f"class-{len(groups)}-groups"
    if config.scenario == "random":
        return f"random{config.forget_fraction * 100:g}"
    if config.scenario == "indices":
        return f"indices{len(config.forget_indices)}"
    return config.scenario


def default_workdir(config) -> str:
    """`runs/<dataset>-<forget set>-<hash of study_settings>`: studies that differ in any
    setting that changes results get different work dirs; the same study gets the same."""
    name = f"{config.dataset}-{_forget_name(config)}-{settings_hash(settings_of(config))}"
    return str(DEFAULT_ROOT / name)


_MISSING = object()


def _show(value) -> str:
    text = "not recorded" if value is _MISSING else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def differences(there: dict, here: dict) -> list[str]:
    """`setting: X there, Y here` for every setting in which two `study_settings` (`there`,
    `here`) differ; methods that only one of them has are named once, not setting by setting."""
    out = []
    a, b = there.get("study", {}), here.get("study", {})
    for key in sorted(a.keys() | b.keys()):
        if a.get(key, _MISSING) != b.get(key, _MISSING):
            out.append(
                f"{key}: {_show(a.get(key, _MISSING))} there, {_show(b.get(key, _MISSING))} here"
            )
    a, b = there.get("methods", {}), here.get("methods", {})
    for only, side in (
        (a.keys() - b.keys(), "there"),
        (b.keys() - a.keys(), "here"),
    ):
        if only:
            names = sorted(only)
            more = f" and {len(names) - 4} more" if len(names) > 4 else ""
            out.append(f"methods only {side}: {','.join(names[:4])}{more}")
    for label in sorted(a.keys() & b.keys()):
        for key in sorted(a[label].keys() | b[label].keys()):
            x, y = a[label].get(key, _MISSING), b[label].get(key, _MISSING)
            if x != y:
                out.append(f"{label}.{key}: {_show(x)} there, {_show(y)} here")
    return out


def recorded_settings(workdir: Path) -> dict | None:
    """The `study_settings` that `workdir`'s results.json records, or None where there is
    none or it is not a study's record (nothing of a study to keep)."""
    try:
        record = json.loads((Path(workdir) / "results.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, Mapping) or not isinstance(record.get("config"), Mapping):
        return None
    rows = record.get("method_configs")
    return study_settings(record["config"], rows if isinstance(rows, Mapping) else {})


def check_workdir_study(workdir: Path, settings: dict, *, default: str | None = None) -> None:
    """Raises ValueError, naming the settings that differ, when `workdir` holds the results of
    a study with other `study_settings` than `settings` (rerunning or resuming the same study
    is fine). `default`: the study's default work dir, offered instead."""
    there = recorded_settings(workdir)
    if there is None:
        return
    diffs = differences(there, settings)
    if not diffs:
        return
    shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    instead = (
        f" or leave it out (this study's own is {default})"
        if default and Path(default) != Path(workdir)
        else ""
    )
    raise ValueError(
        f"--workdir {workdir} holds the results of another study ({shown}): give another "
        f"--workdir{instead}, or --overwrite to replace them"
    )
