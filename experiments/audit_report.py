"""The files of an audit (`python -m experiments.audit`): audit.json (the record, per-example
arrays left out), per_example.npz (KLOM per example, epsilon per forget example, the example
groups), audit.md (the tables, the command, the phases) and the plots: U-LiRA's ROC curves on
log axes, per-example epsilon and KLOM histograms per method. Every file is written atomically
(`experiments.reporting.atomic_write_bytes`); figures draw on an Agg canvas, never pyplot.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from camu_jax.audits import audit_tables
from camu_jax.results import method_title

from .reporting import atomic_write_bytes, method_styles
from .run import _clean

FILES = (
    "audit.json",
    "audit.md",
    "per_example.npz",
    "ulira_roc.png",
    "epsilon_hist.png",
    "klom_hist.png",
)
_RC = {"font.size": 9, "axes.titlesize": 9, "legend.fontsize": 7, "axes.spines.top": False}


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    return buf.getvalue()


def _label(row: str) -> str:
    return {"original": "Original (ceiling)", "retrain": "Retrain (floor)"}.get(
        row, method_title(row)
    )


def roc_figure(ulira: Mapping, rows: list[str]) -> Figure | None:
    styles = method_styles(rows)
    fig = Figure(figsize=(4.6, 3.8), layout="constrained")
    ax = fig.add_subplot()
    drawn = False
    for row in rows:
        m = ulira["methods"][row]
        if not m.get("roc"):
            continue
        st = styles[row]
        ax.plot(
            m["roc"]["fpr"],
            np.maximum(m["roc"]["tpr"], 1e-5),
            color=st.color,
            linestyle=st.linestyle,
            label=f"{_label(row)} (AUC {m['auc']:.3f})",
        )
        drawn = True
    if not drawn:
        return None
    ax.plot([1e-5, 1], [1e-5, 1], ls=":", color="grey", lw=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(1e-5, 1), ylim=(1e-5, 1))
    ax.set(xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(f"U-LiRA, {ulira['models']} shadow models")
    ax.legend(loc="lower right")
    return fig


def _grid(count: int):
    cols = min(count, 3)
    rows = -(-count // cols)
    fig = Figure(figsize=(3.0 * cols, 2.3 * rows), layout="constrained")
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(count)]


def epsilon_figure(values: Mapping, epsilon: Mapping, rows: list[str]) -> Figure:
    styles = method_styles(rows)
    top = 10.0
    bins = np.r_[np.linspace(0, top, 41), top + 0.25]  # the last bin holds everything above
    fig, axes = _grid(len(rows))
    for ax, row in zip(axes, rows, strict=True):
        eps = np.asarray(values[row], np.float64)
        eps = np.clip(eps[np.isfinite(eps)], 0, top + 0.1)
        ax.hist(eps, bins=bins, color=styles[row].color)
        m = epsilon["methods"][row]
        ax.set_title(f"{_label(row)}: F {m['forget_score']:.3f}")
        ax.set_xlabel(f"epsilon per forget example (> {top:g}: last bar)")
    fig.suptitle(f"Epsilon (delta 1e-5), N = {epsilon['models']} per side")
    return fig


def klom_figure(values: Mapping, groups: Mapping, klom: Mapping, rows: list[str]) -> Figure:
    fig, axes = _grid(len(rows))
    finite = [v[np.isfinite(v)] for v in map(np.asarray, values.values())]
    top = max([float(v.max()) for v in finite if v.size] + [1e-3])
    bins = np.linspace(0, top, 31)
    colours = {"forget": "#D55E00", "retain": "#0072B2", "test": "#009E73"}
    for ax, row in zip(axes, rows, strict=True):
        v = np.asarray(values[row], np.float64)
        for group, idx in groups.items():
            g = v[np.asarray(idx)]
            ax.hist(
                g[np.isfinite(g)],
                bins=bins,
                density=True,
                histtype="step",
                color=colours.get(group),
                label=group,
            )
        ax.set_title(_label(row))
        ax.set_xlabel("KLOM per example")
    axes[0].legend()
    fig.suptitle(f"KLOM, N = {klom['models']} unlearned vs {klom['oracles']} oracles")
    return fig


def markdown(record: Mapping, command: str, environment: Mapping) -> str:
    lines = [
        f"# Audit: {environment['dataset']} {environment['model']}",
        "",
        f"Command: `{command}`",
        "",
        f"jax {environment['jax']}, devices: {environment['devices']}; total "
        f"{record['seconds']:.0f} s wall.",
        "",
        audit_tables(record),
        "### Phases",
        "",
        "| phase | seconds | compile seconds | models |",
        "|---|---|---|---|",
    ]
    for p in record["phases"]:
        lines.append(
            f"| {p['phase']} | {p['seconds']:.1f} | {p['compile_seconds']:.1f} | {p['members']} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(record: Mapping, workdir: Path, command: str, environment: Mapping) -> list:
    """Writes every file of `FILES` the record has material for; returns their paths."""
    workdir = Path(workdir)
    per_example = record.get("per_example", {})
    body = {k: v for k, v in record.items() if k != "per_example"}
    body = _clean({**body, "command": command, "environment": dict(environment)})
    written = [
        atomic_write_bytes(workdir / "audit.json", json.dumps(body, indent=2).encode()),
        atomic_write_bytes(workdir / "audit.md", markdown(record, command, environment).encode()),
    ]
    arrays = {}
    for metric in ("klom", "epsilon"):
        for row, v in per_example.get(metric, {}).items():
            arrays[f"{metric}/{row}"] = np.asarray(v)
    for group, idx in per_example.get("groups", {}).items():
        arrays[f"groups/{group}"] = np.asarray(idx)
    if arrays:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        written.append(atomic_write_bytes(workdir / "per_example.npz", buf.getvalue()))
    rows = list(record["rows"])
    with matplotlib.rc_context(_RC):
        figures = {}
        if "ulira" in record:
            figures["ulira_roc.png"] = roc_figure(record["ulira"], rows)
        if "epsilon" in per_example:
            figures["epsilon_hist.png"] = epsilon_figure(
                per_example["epsilon"], record["epsilon"], rows
            )
        if "klom" in per_example:
            figures["klom_hist.png"] = klom_figure(
                per_example["klom"], per_example["groups"], record["klom"], rows
            )
        for name, fig in figures.items():
            if fig is not None:
                written.append(atomic_write_bytes(workdir / name, _png(fig)))
    return written
