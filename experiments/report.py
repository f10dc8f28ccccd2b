"""Rebuild the reports of a finished run: ``python -m experiments.report WORKDIR``.

Reads ``WORKDIR/results.json`` and writes results.csv, results.md and the figures (PNG, PDF and
SVG) next to it (see :func:`experiments.reporting.build_reports`); with ``--figures DIR`` only
the figures, into DIR. Exit code 2 when the file is missing or invalid.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__)
    parser.add_argument("workdir", type=Path, help="directory holding results.json")
    parser.add_argument(
        "--figures",
        type=Path,
        metavar="DIR",
        help="write only the figures (PNG, PDF and SVG), into DIR",
    )
    args = parser.parse_args(argv)
    path = args.workdir / "results.json"
    if not path.is_file():
        print(f"report: error: results file not found: {path}", file=sys.stderr)
        return 2
    # Imported after the path check: matplotlib costs ~1.5 s, which a typo should not wait for.
    from .reporting import build_reports, write_figures

    try:
        results = json.loads(path.read_text())
        if args.figures is not None:
            written = write_figures(results, args.figures)
        else:
            written = build_reports(results, args.workdir)
    except (json.JSONDecodeError, ValueError) as err:
        print(f"report: error: cannot build reports from {path}: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # A full disk, a folder in the way: one line naming the path.
        from .outputs import os_error_line

        print(f"report: error: {os_error_line(err)}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
