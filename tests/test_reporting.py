"""Tests for experiments.reporting and the ``python -m experiments.report`` entry point."""

import copy
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from camu_jax.results import BASELINES
from experiments import reporting

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "results_small.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FORMATS = ("png", "pdf", "svg")
CSV_COLUMNS = (
    "dataset scenario forget_class seed method n_forget UA RA TA mia_efficacy avg_gap rte "
    "seconds remain_train_acc forget_train_acc test_acc test_remain_acc test_forget_acc mia "
    "loss_attack"
).split()


@pytest.fixture()
def results():
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build of the fixture's reports, shared by the read-only checks below."""
    workdir = tmp_path_factory.mktemp("report")
    written = reporting.build_reports(json.loads(FIXTURE.read_text()), workdir)
    return workdir, written


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and data.endswith(b"IEND\xaeB`\x82") and len(data) > 1000


def test_build_reports_writes_every_file(built):
    tmp_path, written = built
    names = {p.name for p in written}
    figures = {f"{s}.{f}" for s in ("per_class_accuracy", "relearning") for f in FORMATS}
    assert names == {"results.csv", "results.md", *figures}
    assert all(p.parent == tmp_path for p in written)
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert _is_png(tmp_path / "per_class_accuracy.png")
    assert _is_png(tmp_path / "relearning.png")


def test_every_figure_is_written_as_pdf_and_svg_beside_its_png(built):
    tmp_path, _ = built
    for stem in ("per_class_accuracy", "relearning"):
        pdf = (tmp_path / f"{stem}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF"), stem
        assert b"Type3" not in pdf  # TrueType fonts, as publishers ask
        svg = ElementTree.fromstring((tmp_path / f"{stem}.svg").read_bytes())  # well-formed
        assert svg.tag == "{http://www.w3.org/2000/svg}svg"
        assert len(svg.findall(".//{http://www.w3.org/2000/svg}path")) > 20, stem  # drawn


def test_figures_are_the_same_bytes_for_the_same_results(built, tmp_path):
    first, _ = built
    reporting.write_figures(json.loads(FIXTURE.read_text()), tmp_path)
    for path in tmp_path.iterdir():  # No dates, fixed SVG ids: a rebuild changes nothing.
        assert path.read_bytes() == (first / path.name).read_bytes(), path.name


# -- styles: one per method, distinct, the same in every figure ---------------------------------

KNOWN = (
    "original retrain camu ft ga neggrad_plus rl boundary_shrink boundary_expand amnesiac unsir "
    "bad_teacher scrub salun l1_sparse ssd unrolling"
).split()


def _distinct(styles) -> bool:
    """Distinct colours, and distinct markers and lines without the colours (greyscale)."""
    styles = list(styles)
    colors = {s.color for s in styles}
    shapes = {(s.marker, s.filled, s.linestyle) for s in styles}
    return len(colors) == len(shapes) == len(styles)


def test_every_known_method_has_its_own_color_and_marker():
    from camu_jax import methods

    assert list(reporting.STYLED_METHODS) == KNOWN
    styles = reporting.method_styles(KNOWN)
    assert len({(s.color, s.marker) for s in styles.values()}) == len(KNOWN)
    assert _distinct(styles.values())
    # Every method the library knows, a new one included (it takes a place after these).
    registered = reporting.method_styles([*BASELINES, *methods.names()])
    assert len({(s.color, s.marker) for s in registered.values()}) == len(registered)
    # The collisions: CaMU and SCRUB were both green, FT and SalUn both red.
    assert styles["camu"].color != styles["scrub"].color
    assert styles["ft"].color != styles["salun"].color
    # Fixed per name: a method is drawn alike whatever else the study holds.
    for name in KNOWN:
        assert reporting.method_styles([name, "retrain"])[name] == styles[name], name


def test_twenty_names_stay_distinct_and_others_are_deterministic():
    others = ["my_method", "ft[learning_rate=0.01]", "ft[learning_rate=0.1]"]
    styles = reporting.method_styles([*KNOWN, *others])
    assert len(styles) == 20 and _distinct(styles.values())
    # None of the other names takes a known method's style, whichever come with them.
    assert reporting.method_styles(["camu", *others]) == {n: styles[n] for n in ["camu", *others]}
    assert reporting.method_styles(reversed(others)) == {n: styles[n] for n in others}
    twenty_new = reporting.method_styles([f"method{i}" for i in range(20)])
    assert _distinct(twenty_new.values())
    # Colours must show on white: none lighter than L* 80 (luminance 0.57).
    for color in reporting.PALETTE:
        r, g, b = (int(color[i : i + 2], 16) / 255 for i in (1, 3, 5))
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
        assert 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2] < 0.57, color


def _all_methods(results: dict) -> dict:
    """The fixture with every known method (CaMU's scores and curves under each name)."""
    results = copy.deepcopy(results)
    for run in results["runs"]:
        for name in KNOWN[3:]:
            run["methods"][name] = dict(run["methods"]["camu"])
            run["relearn"][name] = dict(run["relearn"]["camu"])
    return results


@pytest.mark.parametrize("every_method", [False, True], ids=["3 methods", "17 methods"])
def test_legends_sit_outside_the_data_and_titles_are_short(results, every_method):
    runs = (_all_methods(results) if every_method else results)["runs"]
    for fig in (reporting.per_class_figure(runs), reporting.relearn_figure(runs)):
        FigureCanvasAgg(fig).draw()
        to_figure = fig.transFigure.inverted()
        (legend,) = fig.legends
        box = legend.get_window_extent().transformed(to_figure)
        relearning = fig.axes[0].get_title(loc="left") == "Relearning"  # no curve: Original
        assert len(legend.get_texts()) == (17 if every_method else 3) - relearning
        for ax in fig.axes:
            axes_box = ax.get_position()  # figure coordinates
            assert box.x0 >= axes_box.x1 or box.y1 <= axes_box.y0, (box, axes_box)
            title = ax.get_title(loc="left") or ax.get_title()
            assert 0 < len(title.split()) <= 3 and len(title) <= 24, title
        assert not fig.texts  # no suptitle: details go to the axis labels and the captions


def test_csv_has_one_row_per_run_and_method(results, built):
    tmp_path, _ = built
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 3  # classes x seeds x methods
    for column in CSV_COLUMNS:
        assert column in rows[0], column
    assert [r["method"] for r in rows[:3]] == ["original", "retrain", "camu"]
    assert rows[0]["rte"] == ""  # null stays empty, not "None"
    camu = next(r for r in rows if r["method"] == "camu")
    run0 = results["runs"][0]["methods"]["camu"]
    assert float(camu["UA"]) == run0["UA"] and camu["dataset"] == "mnist"


def test_markdown_tables(results, built):
    tmp_path, _ = built
    md = (tmp_path / "results.md").read_text()
    assert "| Retrain |" in md and "| CaMU |" in md and "±" in md
    assert "Avg. Gap" in md and "MIA-efficacy" in md and "Retrain row is the target" in md
    assert md.index("| Original |") < md.index("| Retrain |") < md.index("| CaMU |")
    assert "Per forgotten class" in md and "| 1 | CaMU |" in md
    # CaMU UA over the four runs: mean of the fixture values, population std.
    ua = [r["methods"]["camu"]["UA"] for r in results["runs"]]
    mean = sum(ua) / len(ua)
    std = (sum((u - mean) ** 2 for u in ua) / len(ua)) ** 0.5
    assert f"| CaMU | {mean:.2f} ± {std:.2f} |" in md


def test_summarize_matches_fixture_and_skips_none(results):
    summary = reporting.summarize(results["runs"])
    assert list(summary) == ["original", "retrain", "camu"]
    for method, metrics in results["summary"].items():
        for key, stats in metrics.items():
            assert summary[method][key]["mean"] == pytest.approx(stats["mean"], abs=1e-5)
            assert summary[method][key]["std"] == pytest.approx(stats["std"], abs=1e-5)
    assert "rte" not in summary["original"]  # all null
    runs = copy.deepcopy(results["runs"])
    runs[0]["methods"]["camu"]["rte"] = None
    rest = [r["methods"]["camu"]["rte"] for r in runs[1:]]
    assert reporting.summarize(runs)["camu"]["rte"]["mean"] == pytest.approx(sum(rest) / 3)


def test_random_removal_without_relearning(results, tmp_path):
    results["scenario"] = "random"
    for run in results["runs"]:
        run["forget_class"] = None
        run.pop("relearn")
        run["methods"]["camu"]["test_forget_acc"] = None
        run["methods"]["my_method"] = dict(run["methods"]["camu"])  # unknown to reporting
    written = reporting.build_reports(results, tmp_path)
    assert "relearning.png" not in {p.name for p in written}
    assert _is_png(tmp_path / "per_class_accuracy.png")
    md = (tmp_path / "results.md").read_text()
    assert "Per forgotten class" not in md and "| my_method |" in md
    assert md.index("| CaMU |") < md.index("| my_method |")


def test_build_reports_rejects_bad_layout(tmp_path):
    with pytest.raises(ValueError, match="runs"):
        reporting.build_reports({"runs": []}, tmp_path)


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.report", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_rebuilds_reports(tmp_path):
    (tmp_path / "results.json").write_text(FIXTURE.read_text())
    proc = _run_cli(str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "results.md").is_file() and _is_png(tmp_path / "relearning.png")
    assert str(tmp_path / "results.csv") in proc.stdout


def test_cli_missing_results_fails_cleanly(tmp_path):
    missing = tmp_path / "nowhere"
    proc = _run_cli(str(missing))
    assert proc.returncode == 2
    assert str(missing / "results.json") in proc.stderr
    assert "Traceback" not in proc.stderr


# -- stale temp files of the atomic writer ------------------------------------------------------


def _killed_during_write(target: Path) -> Path:
    """Runs atomic_write_bytes in a child killed (SIGKILL) just before its os.replace; returns
    the temp file it left behind."""
    code = (
        "import os, signal, sys; from experiments import reporting; "
        "reporting.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL); "
        "reporting.atomic_write_bytes(sys.argv[1], b'half')"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=ROOT, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    (left,) = target.parent.glob(f".{target.name}.*.tmp")
    return left


def test_remove_stale_temp_files_takes_only_the_writers_dead_temp_files(tmp_path):
    (tmp_path / "results.json").write_text("previous")
    killed = _killed_during_write(tmp_path / "results.json")
    old_naming = tmp_path / ".results.json.k3j4h5g6.tmp"  # Before the pid and host were added.
    live = tmp_path / f".results.csv.tmp-{os.getpid()}-{reporting._HOST}-abcd1234.tmp"
    dead_pid = killed.name.split("-")[1]
    host = next(h for h in ("0123abcd", "4567cdef") if h != reporting._HOST)
    other_host = tmp_path / f".results.md.tmp-{dead_pid}-{host}-abcd1234.tmp"
    kept = [
        live,  # This process is alive: a concurrent writer's file in flight.
        other_host,  # A dead pid here, but its writer ran elsewhere: cannot be checked.
        tmp_path / "notes.tmp",
        tmp_path / ".results.json.tmp",
        tmp_path / ".results.json.k3j4h5g6.tmp.bak",
        tmp_path / ".results.json.TOOLONG99.tmp",
    ]
    for path in [old_naming, *kept]:
        path.write_text("x")
    (tmp_path / ".dir.k3j4h5g6.tmp").mkdir()  # Only regular files go.
    (tmp_path / ".link.k3j4h5g6.tmp").symlink_to(tmp_path / "notes.tmp")

    removed = reporting.remove_stale_temp_files(tmp_path, tmp_path / "absent")
    assert sorted(removed) == sorted([killed, old_naming])
    assert not killed.exists() and not old_naming.exists()
    assert all(path.exists() for path in kept)
    assert (tmp_path / ".dir.k3j4h5g6.tmp").is_dir()
    assert (tmp_path / ".link.k3j4h5g6.tmp").is_symlink()
    assert (tmp_path / "results.json").read_text() == "previous"
