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
import math
import os
import re
import socket
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from camu_jax.metrics import mean_std

METHOD_ORDER = ("original", "retrain", "camu")
METHOD_NAMES = {
    "original": "Original",
    "retrain": "Retrain",
    "camu": "CaMU",
    "ft": "FT",
    "ga": "GA",
    "neggrad_plus": "NegGrad+",
    "rl": "RL",
    "amnesiac": "Amnesiac",
    "l1_sparse": "l1-sparse",
    "salun": "SalUn",
    "boundary_shrink": "Boundary shrink",
    "boundary_expand": "Boundary expand",
    "unsir": "UNSIR",
    "bad_teacher": "Bad Teacher",
    "scrub": "SCRUB",
    "ssd": "SSD",
    "unrolling": "Unrolling SGD",
}
# Preferred column order; unknown numeric keys follow, sorted.
METRIC_ORDER = (
    "UA",
    "RA",
    "TA",
    "mia_efficacy",
    "avg_gap",
    "rte",
    "seconds",
    "remain_train_acc",
    "forget_train_acc",
    "test_acc",
    "test_remain_acc",
    "test_forget_acc",
    "mia",
    "loss_attack",
)
SALUN_COLUMNS = (
    ("UA", "UA"),
    ("RA", "RA"),
    ("TA", "TA"),
    ("mia_efficacy", "MIA-efficacy"),
    ("avg_gap", "Avg. Gap"),
    ("seconds", "Time (s)"),
    ("rte", "RTE"),
)
REFERENCE_COLUMNS = (
    ("remain_train_acc", "acc D_r"),
    ("forget_train_acc", "acc D_f"),
    ("test_acc", "acc test"),
    ("test_remain_acc", "acc test remain"),
    ("test_forget_acc", "acc test forget"),
    ("mia", "MIA (ref.)"),
    ("loss_attack", "Loss attack"),
)
PER_CLASS_COLUMNS = (
    ("UA", "UA"),
    ("RA", "RA"),
    ("TA", "TA"),
    ("mia_efficacy", "MIA-efficacy"),
    ("avg_gap", "Avg. Gap"),
    ("mia", "MIA (ref.)"),
)
SPLIT_KEYS = ("forget", "remain", "sample", "test")


def _number(value) -> float | None:
    """A finite float, or None for null, NaN, booleans and non-numbers (nothing to average)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


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


def method_order(runs: Iterable[Mapping]) -> list[str]:
    """original, retrain, camu (those present), then other methods in order of appearance."""
    seen: list[str] = []
    for run in runs:
        seen.extend(m for m in run["methods"] if m not in seen)
    return [m for m in METHOD_ORDER if m in seen] + [m for m in seen if m not in METHOD_ORDER]


def _metric_keys(runs: Iterable[Mapping]) -> list[str]:
    keys = {
        k
        for run in runs
        for metrics in run["methods"].values()
        for k, v in metrics.items()
        if isinstance(v, (int, float)) or v is None
    }
    return [k for k in METRIC_ORDER if k in keys] + sorted(keys - set(METRIC_ORDER))


def summarize(runs: Iterable[Mapping]) -> dict[str, dict[str, dict[str, float]]]:
    """The ``summary`` block: ``{method: {metric: {"mean", "std"}}}`` over runs.

    Population std (ddof=0), as the reference. Nulls, NaNs and non-numbers are skipped; a metric
    with no numeric value for a method is left out.
    """
    runs = list(runs)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for method in method_order(runs):
        per_metric: dict[str, dict[str, float]] = {}
        for key in _metric_keys(runs):
            values = [
                v
                for run in runs
                if (v := _number(run["methods"].get(method, {}).get(key))) is not None
            ]
            if values:
                mean, std = mean_std(values)
                per_metric[key] = {"mean": mean, "std": std}
        summary[method] = per_metric
    return summary


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
    keys = _metric_keys(runs)
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


def _cell(runs: list[dict], method: str, key: str) -> str:
    values = [
        v for run in runs if (v := _number(run["methods"].get(method, {}).get(key))) is not None
    ]
    # A mean over fewer runs than the others says so: runs where the method diverged have no
    # scores (see results.json's "diverged" entries).
    diverged = sum("diverged" in run["methods"].get(method, {}) for run in runs)
    if not values:
        return "diverged" if diverged else "–"
    mean, std = mean_std(values)
    digits = 3 if key == "loss_attack" else 2
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    if diverged and key not in ("seconds", "rte"):
        text += f" ({len(values)} runs; {diverged} diverged)"
    return text


def _table(runs: list[dict], methods: list[str], columns, lead=()) -> list[str]:
    head = [name for name, _ in lead] + ["Method"] + [label for _, label in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        if not any(method in run["methods"] for run in runs):
            continue
        cells = [value for _, value in lead] + [METHOD_NAMES.get(method, method)]
        cells += [_cell(runs, method, key) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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
        *_table(runs, methods, SALUN_COLUMNS),
        "",
        "The Retrain row is the target: UA, RA, TA and MIA-efficacy are better the closer "
        "they are to Retrain's, Avg. Gap (mean |difference| to Retrain over those four) is "
        "better lower, Time lower, RTE (retrain time / method time) higher.",
        "",
        "## CaMU reference metrics",
        "",
        *_table(runs, methods, REFERENCE_COLUMNS),
        "",
        "Accuracies in percent. MIA (ref.) is the CaMU code's XGBoost attack accuracy in "
        "percent (the reference logs a fraction), lower = D_f looks less like members; Loss "
        "attack is the NeurIPS 2023 kit's cross-validated accuracy, 0.5 = indistinguishable "
        "from test data. For both, Retrain's value is the reachable ideal.",
    ]
    if scenario == "class" and len(classes) > 1:
        lines += ["", "## Per forgotten class", ""]
        for i, cls in enumerate(classes):
            block = _table(
                [r for r in runs if _group(r.get("forget_class")) == cls],
                methods,
                PER_CLASS_COLUMNS,
                lead=(("Class", _group_label(cls)),),
            )
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
                label=METHOD_NAMES.get(method, method),
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
                label=f"{METHOD_NAMES.get(method, method)} (mean of {len(curves[method])})",
            )
        else:
            ax.plot([], [], color=color, label=METHOD_NAMES.get(method, method))
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
