"""Reports from a ``results.json``: CSV, Markdown tables and PNG plots.

Every file is written to a temporary file in the same directory and moved into place with
``os.replace`` (atomic on POSIX), so an interrupted run leaves the previous report or none,
never half of one. Plots draw on ``matplotlib.figure.Figure`` with an Agg canvas rather than
``pyplot``, so importing this module never changes the process-wide matplotlib backend.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from camu_jax.metrics import mean_std
from camu_jax.results import (
    METHOD_ORDER,
    METRIC_ORDER,
    PER_CLASS_COLUMNS,
    REFERENCE_COLUMNS,
    SALUN_COLUMNS,
    method_order,
    method_title,
    metric_keys,
    summarize,
    table,
)
from camu_jax.results import METHOD_TITLES as METHOD_NAMES
from camu_jax.results import number as _number

# The schema (metric titles, column sets, method titles, `summarize`) is `camu_jax.results`'s;
# the names above stay importable from here.
__all__ = [
    "METHOD_NAMES",
    "METHOD_ORDER",
    "METRIC_ORDER",
    "PER_CLASS_COLUMNS",
    "REFERENCE_COLUMNS",
    "SALUN_COLUMNS",
    "atomic_write_bytes",
    "build_reports",
    "method_order",
    "remove_stale_temp_files",
    "summarize",
]
SPLIT_KEYS = ("forget", "remain", "sample", "test")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_results(results: Mapping) -> list[dict]:
    """The runs of `results`; raises ValueError naming the first entry whose structure is not
    what `experiments.run` writes (so a damaged file is one error line, not a traceback)."""
    runs = results.get("runs") if isinstance(results, Mapping) else None
    if not isinstance(runs, list) or not runs:
        raise ValueError("results must hold a non-empty 'runs' list")
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping) or not isinstance(run.get("methods"), Mapping):
            raise ValueError(f"runs[{i}] has no 'methods' mapping")
        for method, metrics in run["methods"].items():
            if not isinstance(metrics, Mapping):
                raise ValueError(
                    f"runs[{i}].methods.{method} is a {type(metrics).__name__}, not a mapping"
                )
        fc = run.get("forget_class")
        if not (
            fc is None
            or _is_int(fc)
            or (isinstance(fc, list) and fc and all(_is_int(c) for c in fc))
        ):
            raise ValueError(
                f"runs[{i}].forget_class is {fc!r}; expected a class, a list of classes or null"
            )
        if not (run.get("seed") is None or _is_int(run.get("seed"))):
            raise ValueError(f"runs[{i}].seed is {run.get('seed')!r}; expected an integer")
        for key in ("split_sizes", "relearn", "not_applicable"):
            if run.get(key) is not None and not isinstance(run[key], Mapping):
                raise ValueError(f"runs[{i}].{key} is a {type(run[key]).__name__}, not a mapping")
        for method, curve in (run.get("relearn") or {}).items():
            if curve is None:
                continue
            where = f"runs[{i}].relearn.{method}"
            if not isinstance(curve, Mapping):
                raise ValueError(f"{where} is a {type(curve).__name__}, not a mapping")
            for key in ("batches", "gap"):
                values = curve.get(key)
                if values is not None and not (
                    isinstance(values, list)
                    and all(v is None or _number(v) is not None for v in values)
                ):
                    raise ValueError(f"{where}.{key} is not a list of numbers")
            if len(curve.get("batches") or []) != len(curve.get("gap") or []):
                raise ValueError(f"{where}: batches and gap differ in length")
    return runs


def _group(value) -> tuple[int, ...] | None:
    """A run's `forget_class` (a class, or a list of classes forgotten together) as a tuple."""
    if value is None:
        return None
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def _group_label(group: tuple[int, ...]) -> str:
    """`(0,)` -> "0"; `(0, 1)`, forgotten together -> "0+1"."""
    return "+".join(map(str, group))


# The temp file names the writing process (host and pid), so a later cleanup can tell a file
# whose writer died (stale) from one a concurrent writer is about to move into place.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_RANDOM = r"[a-z0-9_]{8}"  # tempfile.mkstemp's random part.
_TEMP_NAME = re.compile(rf"\.(?P<name>.+)\.tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{{8}})-{_RANDOM}\.tmp")
# Written by versions before the host and pid were added: `.<name>.<random>.tmp`.
_OLD_TEMP_NAME = re.compile(rf"\.(?P<name>.+)\.{_RANDOM}\.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a same-directory temp file and ``os.replace``.

    An OSError (a full disk, a folder in the way) is raised again naming ``path``, not the
    temp file, with the OS's message."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-{_HOST}-", suffix=".tmp"
        )
    except OSError as e:
        raise OSError(e.errno, f"cannot be written ({e.strerror or e})", str(path)) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; reports are meant to be read by others, like a plain open().
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot be written ({e.strerror or e})", str(path)) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Someone else's process.
    return True


def remove_stale_temp_files(*directories: Path) -> list[Path]:
    """Removes the temp files ``atomic_write_bytes`` left in ``directories`` when killed.

    Only regular files named by the writer's own pattern go: those written on this host by a
    process that no longer runs, and those of the older ``.<name>.<random>.tmp`` naming. A
    temp file of a live writer, or one from another host sharing the directory, stays.
    Returns the removed paths; a missing directory is skipped.
    """
    removed = []
    for directory in map(Path, directories):
        if not directory.is_dir():
            continue
        for entry in os.scandir(directory):
            if not entry.is_file(follow_symlinks=False):
                continue
            if match := _TEMP_NAME.fullmatch(entry.name):
                mine = match["host"] == _HOST
                if not mine or _writer_alive(int(match["pid"])):
                    continue
            elif not _OLD_TEMP_NAME.fullmatch(entry.name):
                continue
            Path(entry.path).unlink(missing_ok=True)  # A concurrent cleanup may be first.
            removed.append(Path(entry.path))
    return removed


def _csv_text(results: Mapping, runs: list[dict]) -> str:
    keys = metric_keys(runs)
    header = (
        ["dataset", "scenario", "forget_class", "seed", "method"]
        + [f"n_{k}" for k in SPLIT_KEYS]
        + keys
        + ["diverged"]
    )
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for run in runs:
        sizes = run.get("split_sizes") or {}
        for method in method_order([run]):
            metrics = run["methods"][method]
            row = [
                results.get("dataset"),
                results.get("scenario"),
                None if (g := _group(run.get("forget_class"))) is None else _group_label(g),
                run.get("seed"),
                method,
            ] + [sizes.get(k) for k in SPLIT_KEYS]
            row += [metrics.get(k) for k in keys] + [metrics.get("diverged")]
            writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def _classes(runs: list[dict]) -> list[tuple[int, ...]]:
    """The forgotten class groups of `runs`, sorted: `(c,)` per class, `(0, 1)` for classes
    forgotten together."""
    return sorted({g for run in runs if (g := _group(run.get("forget_class"))) is not None})


def _markdown_text(results: Mapping, runs: list[dict]) -> str:
    methods = method_order(runs)
    seeds = sorted({run.get("seed") for run in runs if run.get("seed") is not None})
    classes = _classes(runs)
    scenario = results.get("scenario")
    lines = [
        f"# Unlearning results: {results.get('dataset')}, {scenario} removal",
        "",
        f"{len(runs)} runs; seeds {seeds}"
        + (f"; forgotten classes {', '.join(map(_group_label, classes))}" if classes else "")
        + ". Cells are mean ± population std over all runs.",
        "",
        "## SalUn metrics",
        "",
        table(runs, SALUN_COLUMNS, markdown=True, methods=methods),
        "",
        "The Retrain row is the target: UA, RA, TA and MIA-efficacy are better the closer "
        "they are to Retrain's, Avg. Gap (mean |difference| to Retrain over those four) is "
        "better lower, Time lower, RTE (retrain time / method time) higher.",
        "",
        "## CaMU reference metrics",
        "",
        table(runs, REFERENCE_COLUMNS, markdown=True, methods=methods),
        "",
        "Accuracies in percent. MIA (ref.) is the CaMU code's XGBoost attack accuracy in "
        "percent (the reference logs a fraction), lower = D_f looks less like members; Loss "
        "attack is the NeurIPS 2023 kit's cross-validated accuracy, 0.5 = indistinguishable "
        "from test data. For both, Retrain's value is the reachable ideal.",
    ]
    if scenario == "class" and len(classes) > 1:
        lines += ["", "## Per forgotten class", ""]
        for i, cls in enumerate(classes):
            block = table(
                [r for r in runs if _group(r.get("forget_class")) == cls],
                PER_CLASS_COLUMNS,
                markdown=True,
                methods=methods,
                lead=(("Class", _group_label(cls)),),
            ).splitlines()
            # One table for all classes: keep the header of the first block only.
            lines += block if i == 0 else block[2:]
    return "\n".join(lines) + "\n"


def _png_bytes(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _per_class_png(runs: list[dict]) -> bytes:
    methods = method_order(runs)
    groups = _classes(runs) or [None]
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) * len(methods)), 6.5))
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(methods)
    x = np.arange(len(groups))
    for ax, key, title in (
        (axes[0], "forget_train_acc", "Forget-train accuracy (D_f)"),
        (axes[1], "remain_train_acc", "Remain-train accuracy (D_r)"),
    ):
        for j, method in enumerate(methods):
            stats = []
            for group in groups:
                sel = [r for r in runs if group is None or _group(r.get("forget_class")) == group]
                values = [
                    v
                    for r in sel
                    if (v := _number(r["methods"].get(method, {}).get(key))) is not None
                ]
                stats.append(mean_std(values) if values else (np.nan, 0.0))
            means, stds = np.array(stats).T
            ax.bar(
                x + (j - (len(methods) - 1) / 2) * width,
                means,
                width,
                yerr=stds,
                capsize=3,
                color=f"C{j}",
                label=method_title(method),
            )
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        ax.set_title(title)
    axes[1].set_xticks(
        x,
        [
            "random" if g is None else f"class{'es' if len(g) > 1 else ''} {_group_label(g)}"
            for g in groups
        ],
    )
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png_bytes(fig)


def _relearn_png(runs: list[dict]) -> bytes | None:
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for run in runs:
        for method, data in (run.get("relearn") or {}).items():
            if data and data.get("batches") and data.get("gap"):
                curves.setdefault(method, []).append(
                    (np.asarray(data["batches"], float), np.asarray(data["gap"], float))
                )
    if not curves:
        return None
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.subplots()
    # Colour by position among all methods so a method has the same colour in every plot.
    order = method_order([*runs, {"methods": curves}])
    for method in (m for m in order if m in curves):
        color = f"C{order.index(method)}"
        for batches, gap in curves[method]:
            ax.plot(batches, gap, color=color, alpha=0.3, linewidth=1)
        # A mean curve only makes sense when every run logged the same batch grid.
        grid = curves[method][0][0]
        if all(b.shape == grid.shape and np.allclose(b, grid) for b, _ in curves[method]):
            mean = np.mean([g for _, g in curves[method]], axis=0)
            ax.plot(
                grid,
                mean,
                color=color,
                linewidth=2.2,
                label=f"{method_title(method)} (mean of {len(curves[method])})",
            )
        else:
            ax.plot([], [], color=color, label=method_title(method))
    ax.set_xlabel("relearning batches on D_r")
    ax.set_ylabel("acc(D_r) - acc(D_f)  (points)")
    ax.set_title("Relearning: a flat gap means forgotten information stays forgotten")
    ax.legend()
    return _png_bytes(fig)


def build_reports(results: Mapping, workdir: Path) -> list[Path]:
    """Write ``results.csv``, ``results.md``, ``per_class_accuracy.png`` and, when any run has
    relearning curves, ``relearning.png`` into ``workdir``; return the paths written."""
    runs = _check_results(results)
    workdir = Path(workdir)
    written = [
        atomic_write_bytes(workdir / "results.csv", _csv_text(results, runs).encode()),
        atomic_write_bytes(workdir / "results.md", _markdown_text(results, runs).encode()),
        atomic_write_bytes(workdir / "per_class_accuracy.png", _per_class_png(runs)),
    ]
    relearn = _relearn_png(runs)
    if relearn is not None:
        written.append(atomic_write_bytes(workdir / "relearning.png", relearn))
    return written
