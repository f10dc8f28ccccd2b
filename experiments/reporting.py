"""Reports from a ``results.json``: CSV, Markdown tables and figures (PNG, PDF and SVG).

Every file is written to a temporary file in the same directory and moved into place with
``os.replace`` (atomic on POSIX), so an interrupted run leaves the previous report or none,
never half of one. Plots draw on ``matplotlib.figure.Figure`` with an Agg canvas rather than
``pyplot``, so importing this module never changes the process-wide matplotlib backend.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import re
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

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
    "figure_files",
    "method_order",
    "method_styles",
    "per_class_figure",
    "relearn_figure",
    "remove_stale_temp_files",
    "summarize",
    "write_figures",
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


# -- figures -----------------------------------------------------------------------------------

# Every known method's place in the palette, fixed so that a method looks the same in every
# figure of every study: the baselines, CaMU, then camu_jax.methods' registry order. Other
# names (new methods, a sweep's points) take the places after these (`method_styles`).
STYLED_METHODS = (
    "original",
    "retrain",
    "camu",
    "ft",
    "ga",
    "neggrad_plus",
    "rl",
    "boundary_shrink",
    "boundary_expand",
    "amnesiac",
    "unsir",
    "bad_teacher",
    "scrub",
    "salun",
    "l1_sparse",
    "ssd",
    "unrolling",
)
# Twenty colours from Okabe & Ito's and Paul Tol's colour-blind-safe sets (none lighter than
# L* 80, so each shows on white), in the places of STYLED_METHODS then three for other names:
# no two closer than CIEDE2000 14.7. Twenty colours cannot all stay apart for a colour-blind
# reader, so a place also has a marker and a line: places k and k + 10 share a marker shape,
# the second hollow and dashed (colours chosen so that those pairs differ in hue as well), so
# that marker, fill and line alone tell the twenty places apart in greyscale too.
PALETTE = (
    "#000000",  # original: black
    "#888888",  # retrain: grey
    "#0072B2",  # camu: blue
    "#E69F00",  # ft: orange
    "#882255",  # ga: wine
    "#225555",  # neggrad_plus: dark teal
    "#66CCEE",  # rl: cyan
    "#BBCC33",  # boundary_shrink: lime
    "#FFAABB",  # boundary_expand: pink
    "#225522",  # amnesiac: dark green
    "#EE3377",  # unsir: magenta
    "#332288",  # bad_teacher: indigo
    "#228833",  # scrub: green
    "#6699CC",  # salun: light blue
    "#44BB99",  # l1_sparse: mint
    "#EE8866",  # ssd: salmon
    "#D55E00",  # unrolling: vermillion
    "#997700",  # other names: ochre,
    "#666633",  # olive,
    "#CC79A7",  # mauve
)
MARKERS = ("o", "s", "*", "D", "^", "v", "P", "X", "h", "<")
LINESTYLES = ("-", "--", "-.", ":")
FIGURE_FORMATS = ("png", "pdf", "svg")
# Figures for print: type-42 (TrueType) fonts in PDF, as publishers ask; a fixed SVG id salt so
# that the same results give the same bytes.
_RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,
    "svg.hashsalt": "camu-jax",
}
_SAVE = {
    "png": {"dpi": 150},
    "pdf": {"metadata": {"CreationDate": None}},
    "svg": {"metadata": {"Date": None}},
}


@dataclasses.dataclass(frozen=True)
class Style:
    """How one method is drawn: colour, marker shape, whether the marker is filled, line."""

    color: str
    marker: str
    filled: bool
    linestyle: str

    def line(self, **kw) -> dict:
        """Keywords of `Axes.plot` / `Line2D` for this style."""
        size = 8.5 if self.marker == "*" else 6.0  # a star looks smaller than the others
        return {
            "color": self.color,
            "marker": self.marker,
            "markersize": size,
            "markerfacecolor": self.color if self.filled else "white",
            "markeredgecolor": self.color,
            "linestyle": self.linestyle,
            **kw,
        }


def _style(place: int) -> Style:
    """Place `place`'s style: colours repeat after 20 places, marker and line after 40."""
    half = (place // len(MARKERS)) % len(LINESTYLES)
    return Style(
        color=PALETTE[place % len(PALETTE)],
        marker=MARKERS[place % len(MARKERS)],
        filled=half % 2 == 0,
        linestyle=LINESTYLES[half],
    )


def method_styles(names) -> dict[str, Style]:
    """`{name: Style}` for `names` (in their order): a method of STYLED_METHODS has its own
    fixed style; the other names take the places after those, in sorted order, so that up to
    20 names differ in colour, and in marker and line, and a name keeps its style across the
    figures of one study."""
    names = list(dict.fromkeys(names))
    others = sorted(n for n in names if n not in STYLED_METHODS)
    place = {n: STYLED_METHODS.index(n) for n in names if n in STYLED_METHODS}
    place.update({n: len(STYLED_METHODS) + i for i, n in enumerate(others)})
    return {n: _style(place[n]) for n in names}


def _handle(style: Style, label: str, **kw) -> Line2D:
    return Line2D([], [], label=label, **style.line(**kw))


def _legend_outside(fig: Figure, handles: list[Line2D]) -> None:
    """The legend to the right of every axes (constrained layout makes room for it)."""
    if not handles:
        return
    fig.legend(
        handles=handles,
        loc="outside right upper",
        ncols=1 if len(handles) <= 20 else 2,
        frameon=False,
        handlelength=2.6,
    )


def _figure_bytes(fig: Figure, fmt: str) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, bbox_inches="tight", pad_inches=0.04, **_SAVE[fmt])
    return buf.getvalue()


def _group_name(group: tuple[int, ...] | None) -> str:
    if group is None:
        return "random"
    return f"class{'es' if len(group) > 1 else ''} {_group_label(group)}"


def _study_methods(runs: list[dict]) -> list[str]:
    """Every method of the study, the relearned ones included: one style set for all figures."""
    return method_order([*runs, *({"methods": r.get("relearn") or {}} for r in runs)])


def per_class_figure(runs: list[dict]) -> Figure:
    """Accuracy on D_f and on D_r per forgotten class group (or the random split), each method
    a marker at its mean over seeds with a ±1 std bar; Retrain's mean, the target, is also a
    dotted line across its group."""
    methods = method_order(runs)
    styles = method_styles(_study_methods(runs))
    groups = _classes(runs) or [None]
    width = min(16.0, max(6.5, 2.0 + 0.13 * len(methods) * len(groups)))
    fig = Figure(figsize=(width, 5.0), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    step = 0.8 / max(1, len(methods))
    x = np.arange(len(groups))
    for ax, key, title, set_name in (
        (axes[0], "forget_train_acc", "Forgetting set", "D_f"),
        (axes[1], "remain_train_acc", "Remaining set", "D_r"),
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
            style = styles[method]
            ax.errorbar(
                x + (j - (len(methods) - 1) / 2) * step,
                means,
                yerr=stds,
                capsize=2,
                elinewidth=0.9,
                zorder=3,
                **style.line(linestyle="none"),
            )
            if method == "retrain":
                ax.hlines(means, x - 0.45, x + 0.45, colors=style.color, linestyles=":", zorder=1)
        for boundary in x[:-1] + 0.5:
            ax.axvline(boundary, color="#DDDDDD", linewidth=0.8, zorder=0)
        ax.set_ylabel(f"accuracy on {set_name} (%)")
        ax.set_ylim(-3, 103)
        ax.set_title(title, loc="left")
    axes[1].set_xticks(x, [_group_name(g) for g in groups])
    axes[1].set_xlim(-0.5, len(groups) - 0.5)
    _legend_outside(
        fig,
        [
            _handle(styles[m], method_title(m), linestyle=":" if m == "retrain" else "none")
            for m in methods
        ],
    )
    return fig


def relearn_figure(runs: list[dict]) -> Figure | None:
    """The relearning curves: the gap acc(D_r) - acc(D_f) while the unlearned models train on
    D_r, one thin line per run and, where the runs share a batch grid, a thick line with
    markers for their mean; None when no run has curves."""
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for run in runs:
        for method, data in (run.get("relearn") or {}).items():
            if data and data.get("batches") and data.get("gap"):
                curves.setdefault(method, []).append(
                    (np.asarray(data["batches"], float), np.asarray(data["gap"], float))
                )
    if not curves:
        return None
    styles = method_styles(_study_methods(runs))
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.subplots()
    handles = []
    order = [m for m in _study_methods(runs) if m in curves]
    most = max(len(c) for c in curves.values())
    for j, method in enumerate(order):
        style = styles[method]
        width = 2.4 if method == "camu" else 1.5
        z = 4 if method == "camu" else 3
        for batches, gap in curves[method]:
            ax.plot(
                batches,
                gap,
                color=style.color,
                linestyle=style.linestyle,
                alpha=0.3,
                linewidth=0.7,
                zorder=z - 1,
            )
        # A mean curve only makes sense when every run logged the same batch grid.
        grid = curves[method][0][0]
        if all(b.shape == grid.shape and np.allclose(b, grid) for b, _ in curves[method]):
            mean = np.mean([g for _, g in curves[method]], axis=0)
            every = max(1, len(grid) // 6)
            # Staggered, so that curves running together still show every marker.
            ax.plot(
                grid, mean, markevery=(j % every, every), linewidth=width, zorder=z, **style.line()
            )
        label = method_title(method)
        if len(curves[method]) < most:  # diverged runs have no curve
            label += f" ({len(curves[method])} of {most} runs)"
        handles.append(_handle(style, label, linewidth=width))
    ax.set_xlabel("batches of relearning on D_r")
    ax.set_ylabel("acc(D_r) - acc(D_f) (points)")
    ax.set_title("Relearning", loc="left")
    _legend_outside(fig, handles)
    return fig


def figure_files(runs: list[dict]) -> dict[str, bytes]:
    """`{file name: bytes}` of every figure of `runs`, each as PNG, PDF and SVG:
    per_class_accuracy.*, and relearning.* when any run has relearning curves."""
    out = {}
    with matplotlib.rc_context(_RC):
        for stem, make in (
            ("per_class_accuracy", per_class_figure),
            ("relearning", relearn_figure),
        ):
            fig = make(runs)
            if fig is not None:
                out.update({f"{stem}.{fmt}": _figure_bytes(fig, fmt) for fmt in FIGURE_FORMATS})
    return out


def write_figures(results: Mapping, directory: Path) -> list[Path]:
    """Write the figures of `results` (`figure_files`) into `directory`; return their paths."""
    files = figure_files(_check_results(results))
    return [atomic_write_bytes(Path(directory) / name, data) for name, data in files.items()]


def build_reports(results: Mapping, workdir: Path) -> list[Path]:
    """Write ``results.csv``, ``results.md`` and the figures (``per_class_accuracy`` and, when
    any run has relearning curves, ``relearning``, each as .png, .pdf and .svg) into
    ``workdir``; return the paths written."""
    runs = _check_results(results)
    workdir = Path(workdir)
    written = [
        atomic_write_bytes(workdir / "results.csv", _csv_text(results, runs).encode()),
        atomic_write_bytes(workdir / "results.md", _markdown_text(results, runs).encode()),
    ]
    return written + write_figures(results, workdir)
