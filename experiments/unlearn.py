"""Main job: original vs retrained vs CaMU-unlearned model, evaluated side by side.

    python -m experiments.unlearn                     # embedded default: digits, CNN, class 0
    python -m experiments.unlearn --dataset mnist --manual-dir ../shared/data/mnist \
        --scenario class --forget-class 0 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.unlearn",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dataset",
        default="digits",
        help="digits (default, ships with scikit-learn), mnist, fashion_mnist, cifar10, cifar100",
    )
    p.add_argument(
        "--model",
        default=None,
        help="cnn, resnet18 (ImageNet stem, 224x224 as the reference) or resnet18_cifar; "
        "default: cnn for MNIST-like data, resnet18 for CIFAR",
    )
    p.add_argument("--scenario", default="class", help="class, random, proportions or indices")
    p.add_argument(
        "--forget-class",
        default="0",
        help="class removal: a class (0), several forgotten together (0,1), or 'all' "
        "(one run per class)",
    )
    p.add_argument("--forget-fraction", type=float, default=0.1, help="random removal share of D")
    p.add_argument(
        "--forget-proportions",
        type=_floats,
        default=(),
        help="scenario proportions: per-class shares, comma separated",
    )
    p.add_argument(
        "--forget-indices",
        type=Path,
        default=None,
        help="scenario indices: a .npy or text file of training indices",
    )
    p.add_argument("--seeds", type=_ints, default=(0,), help="comma separated, e.g. 0,1,2")
    p.add_argument(
        "--original-epochs",
        type=int,
        default=20,
        help="epochs of the original and the retrained model (reference: 20)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--camu-epochs", type=int, default=None, help="override the preset")
    p.add_argument("--kl-lr", type=float, default=None, help="override the preset (step A)")
    p.add_argument("--impair-lr", type=float, default=None, help="override the preset (step B)")
    p.add_argument("--no-relearn", action="store_true", help="skip the relearning check")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="results and checkpoints (default runs/<dataset>-<model>-<scenario>)",
    )
    p.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="where trained models are kept and reused (default <workdir>/checkpoints)",
    )
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default ~/tensorflow_datasets)")
    p.add_argument("--manual-dir", default=None, help="offline source files for the TFDS builder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--xla-cache",
        default=os.path.expanduser("~/.cache/camu_jax/xla"),
        help="persistent compilation cache ('' disables)",
    )
    return p


def config_from_args(args: argparse.Namespace):
    import dataclasses

    from experiments.configs import NUM_CLASSES, ExperimentConfig, default_model

    model = args.model or default_model(args.dataset)
    if args.forget_class.strip() == "all":
        if args.dataset not in NUM_CLASSES:
            raise ValueError(f"unknown dataset {args.dataset!r}; allowed: {', '.join(NUM_CLASSES)}")
        groups = tuple((c,) for c in range(NUM_CLASSES[args.dataset]))
    else:
        try:
            groups = (_ints(args.forget_class),)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"--forget-class: {e} (or 'all')") from None
    if args.forget_indices is not None and args.forget_indices.is_dir():
        raise ValueError(
            f"--forget-indices {args.forget_indices} is a directory; expected a .npy or text file"
        )
    indices: tuple[int, ...] = ()
    if args.forget_indices is not None:
        path = args.forget_indices
        if not path.exists():
            raise ValueError(f"--forget-indices file {path} does not exist")
        arr = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, dtype=np.int64, ndmin=1)
        indices = tuple(int(i) for i in np.asarray(arr).ravel())
    workdir = args.workdir or Path("runs") / f"{args.dataset}-{model}-{args.scenario}"
    config = ExperimentConfig(
        dataset=args.dataset,
        model=model,
        scenario=args.scenario,
        forget_classes=groups,
        forget_fraction=args.forget_fraction,
        forget_proportions=args.forget_proportions,
        forget_indices=indices,
        seeds=args.seeds,
        original_epochs=args.original_epochs,
        batch_size=args.batch_size,
        relearn=not args.no_relearn,
        workdir=str(workdir),
        checkpoint_dir=None if args.checkpoint_dir is None else str(args.checkpoint_dir),
        data_dir=args.data_dir,
        manual_dir=args.manual_dir,
        progress=not args.no_progress,
    )
    config.validate()
    overrides = {
        k: v
        for k, v in (
            ("epochs", args.camu_epochs),
            ("kl_lr", args.kl_lr),
            ("impair_lr", args.impair_lr),
        )
        if v is not None
    }
    if overrides:
        config = dataclasses.replace(
            config, camu=dataclasses.replace(config.camu_config(), **overrides)
        )
    return config


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        check_writable_dir(Path(config.workdir), "--workdir")
        if config.checkpoint_dir is not None:
            check_writable_dir(Path(config.checkpoint_dir), "--checkpoint-dir")
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
