"""Population audits of unlearning methods: U-LiRA, KLOM and the NeurIPS 2023 epsilon score.

    python -m experiments.audit --dataset digits --methods camu,ft --models 64 \\
        --forget-fraction 0.1 --metrics ulira,klom,epsilon

Trains every population the metrics need once (`camu_jax.audit`: U-LiRA's shadow originals on
complementary halves, and for KLOM and epsilon the originals on D, the oracles on D \\ F and
the floor's other oracles), unlearns every original with every method, checkpoints every model
as the study does (--checkpoint-dir, default <workdir>/checkpoints: a rerun restores them) and
writes audit.json, audit.md, per_example.npz and the plots into --workdir. Original and
Retrain are always audited (the ceiling and the floor). docs/audits.md explains the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path


def _csv(kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(t.strip()) for t in text.split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__} values, got {text!r}"
            ) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.audit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--dataset", default="digits", help="digits, mnist, fashion_mnist, cifar10 or cifar100")
    add("--model", default=None, help="cnn, resnet18 or resnet18_cifar (default: the dataset's)")
    add(
        "--methods",
        type=_csv(str),
        default=("camu",),
        help="unlearning methods of camu_jax.methods, comma separated, or all (retrain and "
        "original are always audited and may be named) (default: camu)",
    )
    add(
        "--metrics",
        type=_csv(str),
        default=("ulira", "klom", "epsilon"),
        help="any of ulira, klom, epsilon (default: all three)",
    )
    add("--models", type=int, default=64, help="models per population, even (default 64)")
    add(
        "--forget-fraction",
        type=float,
        default=0.1,
        help="forget sets' share: of each shadow model's half (U-LiRA), of the training set "
        "(KLOM, epsilon) (default 0.1)",
    )
    add(
        "--forget-class",
        type=_csv(int),
        default=(),
        help="KLOM and epsilon forget these whole classes instead (U-LiRA refuses class removal)",
    )
    add("--seed", type=int, default=0, help="seed of the designs and every model's seed (0)")
    add(
        "--variance",
        default="auto",
        help="U-LiRA's Gaussians: auto (per example from 32 models a side on), global or "
        "per_example (default auto)",
    )
    add("--original-epochs", type=int, default=20, help="epochs of originals and oracles (20)")
    add("--batch-size", type=int, default=32, help="batch of originals, oracles and CaMU (32)")
    add("--learning-rate", type=float, default=1e-3, help="Adam lr of originals, oracles (1e-3)")
    add("--weight-decay", type=float, default=1e-4, help="their coupled L2 (1e-4)")
    add(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="METHOD.FIELD=VALUE",
        help="a setting of an unlearning method, e.g. ft.epochs=5 (repeatable; no sweeps)",
    )
    add("--population-size", type=int, default=None, help="models per wave (1: one at a time)")
    add("--workdir", default=None, help="outputs (default runs/audit-<dataset>-<model>)")
    add("--checkpoint-dir", default=None, help="models, reused (default <workdir>/checkpoints)")
    add("--checkpoint-every", type=float, default=60.0, help="seconds between checkpoints (60)")
    add("--data-dir", default=None, help="TFDS data dir (default ~/tensorflow_datasets)")
    add("--manual-dir", default=None, help="offline source files for the TFDS builder")
    add(
        "--xla-cache",
        default=os.path.expanduser("~/.cache/camu_jax/xla"),
        help="persistent compilation cache ('' disables)",
    )
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    return p


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A validated command line: the audit's config, the methods' configs and the rest."""

    args: argparse.Namespace
    model: str
    workdir: Path
    audit: object  # camu_jax.audits.AuditConfig
    methods: tuple  # method configs
    train: object  # camu_jax.TrainConfig


def method_configs(args, model: str) -> tuple:
    """The methods' configs: CaMU's preset for the scenario with --batch-size, the others the
    dataset's defaults, `--set` over both; ValueError naming any bad name or setting."""
    from camu_jax import methods
    from camu_jax.methods.camu import camu_preset

    from .cli import parse_settings
    from .configs import apply_settings, is_sweep

    names = []
    for name in args.methods:
        names += list(methods.names()) if name == "all" else [name]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"--methods {','.join(args.methods)} names {', '.join(twice)} twice")
    names = [n for n in names if n not in ("original", "retrain")]
    for name in names:
        if name not in methods.REGISTRY:
            raise ValueError(
                f"unknown method {name!r}; known methods: {', '.join(methods.names())}, "
                "retrain, original, all"
            )
    settings = parse_settings(args.settings)
    for name in sorted(set(settings) - set(names)):
        raise ValueError(
            f"--set {name}.{next(iter(settings[name]))}: {name} is not among the audited "
            f"methods ({', '.join(names) or 'none'})"
        )
    scenario = "class" if args.forget_class else "random"
    out = []
    for name in names:
        if name == "camu":
            base = dataclasses.replace(
                camu_preset(args.dataset, scenario), batch_size=args.batch_size
            )
        else:
            base = methods.get(name, dataset=args.dataset)
        own = settings.get(name, {})
        for field, value in own.items():
            if is_sweep(name, field, value):
                raise ValueError(f"--set {name}.{field}: sweeps are not audited; give one value")
        config = apply_settings(base, own)
        config.validate()
        out.append(config)
    return tuple(out)


def resolve(args: argparse.Namespace) -> Resolved:
    """Every check that needs no data: ValueError naming the first bad value."""
    from camu_jax.audits import AuditConfig
    from camu_jax.models import MODELS
    from camu_jax.training import TrainConfig

    from .configs import NUM_CLASSES, default_model

    if args.dataset not in NUM_CLASSES:
        raise ValueError(f"unknown dataset {args.dataset!r}; allowed: {', '.join(NUM_CLASSES)}")
    model = args.model or default_model(args.dataset)
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; allowed: {', '.join(MODELS)}")
    config = AuditConfig(
        metrics=tuple(args.metrics),
        models=args.models,
        forget_fraction=args.forget_fraction,
        forget_classes=tuple(args.forget_class) or None,
        seed=args.seed,
        variance=args.variance,
    )
    config.validate(NUM_CLASSES[args.dataset])
    if args.population_size is not None and args.population_size < 1:
        raise ValueError(f"--population-size {args.population_size} must be at least 1")
    train = TrainConfig(
        epochs=args.original_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
    )
    train.validate()
    workdir = Path(args.workdir or Path("runs") / f"audit-{args.dataset}-{model}")
    return Resolved(args, model, workdir, config, method_configs(args, model), train)


def run(r: Resolved, command: str, *, log=print) -> dict:
    """Loads the data, runs the audit and writes its files; returns the record."""
    import jax

    from camu_jax import checkpointing, sharding
    from camu_jax.audits import audit, audit_tables
    from camu_jax.data.loading import load_dataset
    from camu_jax.data.pipeline import DeviceData, input_spec_for
    from camu_jax.models import create_model

    from .audit_report import write_outputs
    from .reporting import remove_stale_temp_files
    from .run import checkpoint_store

    args = r.args
    devices = jax.devices()
    mesh = sharding.make_mesh(
        devices, member_devices=1 if args.population_size == 1 else len(devices)
    )
    for name, batch in [("", r.train.batch_size)] + [
        (f"{m.name} ", m.batch_size) for m in r.methods
    ]:
        try:
            sharding.check_batch_size(batch, mesh)
        except ValueError as e:
            raise ValueError(f"{name}{e}") from None
    main = jax.process_index() == 0
    data = load_dataset(
        args.dataset,
        data_dir=args.data_dir,
        manual_dir=args.manual_dir,
        progress=args.progress and main,
    )
    spec = input_spec_for(args.dataset, r.model)
    train = DeviceData.put(data.train_images, data.train_labels, spec=spec, mesh=mesh)
    test = DeviceData.put(data.test_images, data.test_labels, spec=spec, mesh=mesh)
    store = checkpoint_store(
        args.checkpoint_dir, r.workdir, args.dataset, r.model, data, args.checkpoint_every
    )
    lock = checkpointing.lock_directory(r.workdir) if main else None
    try:
        if main:
            remove_stale_temp_files(r.workdir)
        record = audit(
            create_model(r.model, num_classes=data.num_classes),
            train=train,
            test=test,
            methods=list(r.methods),
            train_config=r.train,
            num_classes=data.num_classes,
            config=r.audit,
            dataset=args.dataset,
            store=store,
            population_size=args.population_size,
            progress=args.progress and main,
            log=log if main else None,
        )
        if main:
            environment = {
                "dataset": args.dataset,
                "model": r.model,
                "jax": jax.__version__,
                "devices": f"{len(devices)} x {devices[0].device_kind}",
            }
            write_outputs(record, r.workdir, command, environment)
            log("\n" + audit_tables(record))
    finally:
        if lock is not None:
            lock.release()
    return record


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from .unlearn import check_writable_dir, use_cpu_cores, use_xla_cache

    try:
        resolved = resolve(args)
        check_writable_dir(resolved.workdir, "--workdir")
        if args.checkpoint_dir is not None:
            check_writable_dir(Path(args.checkpoint_dir), "--checkpoint-dir")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.population_size != 1:
        use_cpu_cores()
    import jax

    if args.xla_cache:
        use_xla_cache(args.xla_cache)
    from camu_jax.sharding import maybe_initialize_distributed

    command = shlex.join(["python", "-m", "experiments.audit", *argv])
    start = time.perf_counter()
    try:
        maybe_initialize_distributed()
        run(resolved, command)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        from .outputs import os_error_line

        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        took = time.perf_counter() - start
        print(f"audit: {resolved.workdir / 'audit.json'}  (total {took:.1f}s)")
    return 0


if __name__ == "__main__":
    from .interrupts import stop_on_signals

    with stop_on_signals():
        sys.exit(main())
