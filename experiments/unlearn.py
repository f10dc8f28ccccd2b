"""Main job: original vs retrained vs CaMU-unlearned model, evaluated side by side.

    python -m experiments.unlearn                     # embedded default: digits, CNN, class 0
    python -m experiments.unlearn --dataset mnist --manual-dir ../shared/data/mnist \
        --scenario class --forget-class 0 --seeds 0,1,2

    python -m experiments.unlearn --methods camu,ft,scrub \
        --set ft.learning_rate=0.05 --set scrub.epochs=5    # any method's setting
    python -m experiments.unlearn --config runs/digits-class0-<hash>/config.toml  # rerun a study

Every setting of experiments.configs.ExperimentConfig is a flag; CaMU's (camu_jax.CamuConfig)
are --camu-*, defaulting to the reference preset of the dataset and scenario. Every method's
settings are --set METHOD.FIELD=VALUE (CaMU's coefficients flat: camu.rep_sample). A study
file (--config, TOML: what the work dir's config.toml holds) gives any of them; flags given
beside it win.

Without --workdir a study writes into runs/<dataset>-<forget set>-<hash of its settings> (printed
at the start), so studies with other settings never write over each other; a --workdir
whose results.json records other settings is refused, naming them, unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_config_arguments
    from .configs import ExperimentConfig

    p = argparse.ArgumentParser(
        prog="python -m experiments.unlearn",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, ExperimentConfig)
    p.add_argument(
        "--config",
        dest="study_file",
        type=Path,
        metavar="STUDY.toml",
        help="a study file (TOML; a work dir's config.toml reruns its study): top-level keys "
        "as the flags' names with underscores, [method_settings.NAME] tables as --set; the "
        "flags given beside it win",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of another study in --workdir (without it a work dir whose "
        "results.json records other settings is refused, naming them)",
    )
    p.add_argument(
        "--xla-cache",
        default=os.path.expanduser("~/.cache/camu_jax/xla"),
        help="persistent compilation cache ('' disables)",
    )
    return p


def check_writable_dir(path: Path, flag: str) -> None:
    """Raises ValueError unless `path` is, or can be created as, a writable directory.

    Checked before any data is loaded or model trained, so a bad --workdir fails in seconds,
    not when the first results are written. Writability is probed by creating (and removing)
    a file in `path` or its nearest existing parent: permission bits say nothing about a
    read-only mount, and nothing for root.
    """
    existing = path
    try:
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            where = "is an existing file" if existing == path else f"lies under the file {existing}"
            raise ValueError(f"{flag} {path} {where}, not a directory")
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".camu-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{flag} {path} is not writable ({existing}: {e.strerror or e})") from None


def use_xla_cache(directory: str) -> None:
    """JAX's persistent compilation cache in `directory`, for every program, however small:
    a warm run then compiles nothing (small programs each cost a few hundred milliseconds on
    a GPU, and a run has dozens of them)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def use_cpu_cores() -> None:
    """One XLA CPU device per usable core, so that a population's members run in parallel on
    the host's cores when JAX runs on the CPU (XLA:CPU runs one member's small steps on about
    one core); ignored on accelerators. Must run before JAX starts its backends (XLA reads
    the flag then); a device count the user already set in XLA_FLAGS is kept."""
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags or xla_bridge.backends_are_initialized():
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores and cores > 1:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cores}".strip()


def main(argv: list[str] | None = None) -> int:
    from .cli import config_from_args

    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        check_writable_dir(Path(config.workdir), "--workdir")
        if config.checkpoint_dir is not None:
            check_writable_dir(Path(config.checkpoint_dir), "--checkpoint-dir")
        from .outputs import check_workdir_study, default_workdir, settings_of

        default = default_workdir(config)
        if not args.overwrite:
            check_workdir_study(Path(config.workdir), settings_of(config), default=default)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if config.population_size != 1:
        use_cpu_cores()
    import jax

    if args.xla_cache:
        use_xla_cache(args.xla_cache)
    from camu_jax.sharding import maybe_initialize_distributed

    from .run import run_experiment

    t0 = time.perf_counter()
    try:
        maybe_initialize_distributed()
        if jax.process_index() == 0:
            named = " (named after the settings)" if config.workdir == default else ""
            print(f"work dir: {config.workdir}{named}", flush=True)
        results = run_experiment(config)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # A full disk, a folder in the way: one line naming the path.
        from .outputs import os_error_line

        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    if jax.process_index() != 0:  # process 0 reports for the whole job
        return 0
    print("\nphases: " + ", ".join(f"{p['phase']} {p['seconds']:.1f}s" for p in results["phases"]))
    print(
        f"results: {Path(config.workdir) / 'results.json'}  (total {time.perf_counter() - t0:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    from .interrupts import stop_on_signals

    with stop_on_signals():  # Ctrl-C, SIGTERM: one line and exit 130/143 within seconds
        sys.exit(main())
