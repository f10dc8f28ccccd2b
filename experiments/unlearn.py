"""Main job: original vs retrained vs CaMU-unlearned model, evaluated side by side.

    python -m experiments.unlearn                     # embedded default: digits, CNN, class 0
    python -m experiments.unlearn --dataset mnist --manual-dir ../shared/data/mnist \
        --scenario class --forget-class 0 --seeds 0,1,2

Every setting of experiments.configs.ExperimentConfig is a flag; CaMU's (camu_jax.CamuConfig)
are --camu-*, defaulting to the reference preset of the dataset and scenario.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from experiments.cli import add_config_arguments
    from experiments.configs import ExperimentConfig

    p = argparse.ArgumentParser(
        prog="python -m experiments.unlearn",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, ExperimentConfig)
    p.add_argument(
        "--xla-cache",
        default=os.path.expanduser("~/.cache/camu_jax/xla"),
        help="persistent compilation cache ('' disables)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from experiments.cli import config_from_args

    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    if args.xla_cache:
        jax.config.update("jax_compilation_cache_dir", args.xla_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from camu_jax.sharding import maybe_initialize_distributed
    from experiments.run import run_experiment

    maybe_initialize_distributed()
    t0 = time.perf_counter()
    try:
        results = run_experiment(config)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\nphases: " + ", ".join(f"{p['phase']} {p['seconds']:.1f}s" for p in results["phases"]))
    print(
        f"results: {Path(config.workdir) / 'results.json'}  (total {time.perf_counter() - t0:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
