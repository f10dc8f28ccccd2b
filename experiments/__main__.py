"""One command for the scripts: `camu-jax COMMAND ARGS` installed, `python -m experiments
COMMAND ARGS` from a checkout; each command is `python -m experiments.COMMAND ARGS`.

Installed, `experiments/` is the package `camu_jax.experiments` (setup.py), so this module is
`camu_jax.experiments.__main__` there and its commands are that package's modules.
"""

from __future__ import annotations

import importlib
import sys

# command -> the module of this package whose `main(argv) -> exit status` runs it
COMMANDS = {
    "unlearn": "unlearn",
    "report": "report",
    "tune": "tune",
    "benchmark": "benchmark.cli",
}
USAGE = """usage: camu-jax {unlearn,report,tune,benchmark} [ARGS]

    camu-jax unlearn [ARGS]      the main job (`camu-jax unlearn --help` lists its flags)
    camu-jax report WORKDIR      rebuild a finished run's reports from its results.json
    camu-jax tune [ARGS] METHOD  tune unlearning methods on a split held out of D_r
    camu-jax benchmark [ARGS]    time JAX against the PyTorch port of the reference"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, *rest = argv
    if command not in COMMANDS:
        print(
            f"camu-jax: error: unknown command {command!r} (choose from {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(f"{__package__}.{COMMANDS[command]}")
    if command != "unlearn":
        return module.main(rest)
    from .interrupts import stop_on_signals

    # As `python -m experiments.unlearn`: Ctrl-C, SIGTERM: one line and exit 130/143.
    with stop_on_signals():
        return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
