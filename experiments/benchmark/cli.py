"""The command line: which sections run, in which order, and the JSON file they fill.

python -m experiments.benchmark --out FILE.json [--quick] [--only SECTIONS] [--mnist-dir DIR]
python -m experiments.benchmark --out FILE.json --only study [--study-dataset mnist ...]
python -m experiments.benchmark --out FILE.json --only compile [--compile-jobs main,tune ...]
python -m experiments.benchmark --out FILE.json --only audit [--audit-args '...']
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import audit as audit_part
from . import compile as compile_part
from . import study
from .data import DEFAULT_MNIST_DIR, MNIST_SHAPE, PRESETS

SECTIONS = (
    "step",
    "end_to_end",
    "eval",
    "memory",
    "wgrad_chunking",
    "convs",
    "study",
    "placement",
    "compile",
    "audit",
)
DEFAULT_SECTIONS = "step,end_to_end,eval,memory"
# Every step benchmark of any backend (`steps.step_configs`); a name absent on this backend is
# reported as skipped.
STEP_NAMES = (
    "cnn_b32",
    "cnn_b256",
    "resnet18_cifar_b32",
    "resnet18_cifar_b128",
    "resnet18_224_b32",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmark",
        description="Speed of camu_jax against the PyTorch port of the reference, and of "
        "populations against runs one at a time (docs/benchmarks.md).",
    )
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="a few minutes, synthetic data")
    parser.add_argument(
        "--mnist-dir",
        type=Path,
        default=DEFAULT_MNIST_DIR,
        help="MNIST IDX files (default: ../shared/data/mnist)",
    )
    parser.add_argument(
        "--only",
        default=DEFAULT_SECTIONS,
        help=f"comma-separated subset of {','.join(SECTIONS)} (default {DEFAULT_SECTIONS}; "
        "wgrad_chunking, an ablation of the CPU weight-gradient chunking, convs, each CNN "
        "layer as XLA's convolution against patch products (the CPU conv-form rule), study, "
        "a whole study in population and sequential mode, placement, the default placement against "
        "one run at a time on the MNIST job, the digits main job and the digits study, and "
        "compile, programs and compile seconds cold and warm per phase of the digits jobs and "
        "a learning-rate grid as a population against one point at a time, and audit, the "
        "population audit against the same audit one model at a time (multiplied out from a "
        "few), run only when named)",
    )
    parser.add_argument(
        "--steps",
        default=None,
        help="comma-separated subset of the step benchmarks (e.g. cnn_b32,cnn_b256; default all)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the PyTorch side (default: PyTorch's own choice)",
    )
    study.add_arguments(parser)
    parser.add_argument(
        "--placement-scenarios",
        default=None,
        help="--only placement: comma-separated scenarios (default mnist_class0, "
        "mnist_random10, mnist_classes01, digits_main, digits_study; reference_class0 and "
        "reference_random10, the 20-epoch MNIST reference jobs beside the PyTorch port, run only "
        "when named)",
    )
    compile_part.add_arguments(parser)
    audit_part.add_arguments(parser)
    parser.add_argument("--memory-worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--payload", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=2, help=argparse.SUPPRESS)
    return parser


def _csv(text: str, allowed, flag: str, parser) -> list[str]:
    names = [t for t in text.split(",") if t.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown or not names:
        parser.error(f"{flag} {text!r}: unknown {unknown}; allowed: {','.join(allowed)}")
    return names


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.memory_worker:
        from .memory import memory_worker

        print(json.dumps(memory_worker(args.memory_worker, args.payload, args.epochs)))
        return 0
    if args.out is None:
        parser.error("--out is required")
    sections = set(_csv(args.only, SECTIONS, "--only", parser))
    wanted_steps = _csv(args.steps, STEP_NAMES, "--steps", parser) if args.steps else None

    def settings(section, parse):
        """A section's settings from the flags (None where it does not run); a bad flag is
        the parser's error."""
        if section not in sections:
            return None
        try:
            return parse(args)
        except ValueError as e:
            parser.error(str(e))

    study_args = settings("study", study.args_from_cli)
    compile_settings = settings("compile", compile_part.settings_from_cli)
    audit_settings = settings("audit", audit_part.args_from_cli)

    placement_names = None
    if "placement" in sections:
        from .placement import ALL_SCENARIOS, DEFAULT_SCENARIOS

        text = args.placement_scenarios or ",".join(DEFAULT_SCENARIOS)
        placement_names = _csv(text, ALL_SCENARIOS, "--placement-scenarios", parser)

    from ..reporting import atomic_write_bytes
    from . import env

    if warning := env.load_warning():
        print(f"[benchmark] warning: {warning}", flush=True)
    data = None
    if sections & {"end_to_end", "eval", "memory"}:
        from .data import load_mnist

        data = load_mnist(args.mnist_dir, synthetic=args.quick)
    memory = None
    if "memory" in sections:
        from .memory import bench_memory

        # First, while this process is small: a forked child's ru_maxrss starts at its size.
        print("[benchmark] memory ...", flush=True)
        memory = bench_memory(
            data,
            epochs=1 if args.quick else PRESETS["mnist_class"]["epochs"],
            torch_threads=args.torch_threads,
        )
    results = env.environment()
    results["quick"] = args.quick
    if data is not None:
        results["data"] = data["data"]
    started = time.perf_counter()
    status = 0

    if "step" in sections:
        results["step"] = _steps(args.quick, wanted_steps)
    if sections & {"end_to_end", "eval"}:
        from .data import original_weights

        variables, state_dict = original_weights()
    if "end_to_end" in sections:
        from .end_to_end import bench_end_to_end

        repeats = (
            {"mnist_class": 1, "mnist_random": 1}
            if args.quick
            else {"mnist_class": 3, "mnist_random": 2}
        )
        results["end_to_end"] = bench_end_to_end(
            data, variables, state_dict, repeats=repeats, quick=args.quick
        )
    if "wgrad_chunking" in sections:
        from .steps import bench_wgrad_chunking

        print("[benchmark] wgrad_chunking ...", flush=True)
        configs = [("cnn_b32", "cnn", MNIST_SHAPE, 32, 5 if args.quick else 50)]
        if not args.quick:
            configs.append(("resnet18_cifar_b32", "resnet18_cifar", (32, 32, 3), 32, 1))
        results["wgrad_chunking"] = bench_wgrad_chunking(configs, repeats=3 if args.quick else 5)
    if "convs" in sections:
        from .convs import bench_convs

        print("[benchmark] convs ...", flush=True)
        results["convs"] = bench_convs(repeats=3 if args.quick else 5, quick=args.quick)
    if "eval" in sections:
        from .evaluation import bench_eval

        print("[benchmark] eval ...", flush=True)
        results["eval"] = bench_eval(data, variables, state_dict, repeats=3 if args.quick else 5)
    if memory is not None:
        results["memory"] = memory
    if study_args is not None:
        results["study"], status = _study(study_args, args.study_repeats)
    if "placement" in sections:
        from .placement import bench_placement

        results["placement"] = bench_placement(placement_names, args.mnist_dir)
    if compile_settings is not None:
        results["compile"], compile_status = compile_part.bench_compile(compile_settings)
        status = status or compile_status

    if audit_settings is not None:
        try:
            results["audit"] = audit_part.bench_audit(*audit_settings)
        except audit_part.AuditError as e:
            print(f"error: {e}", file=sys.stderr)
            results["audit"] = {"args": audit_settings[0], "error": str(e)}
            status = 1

    results["device"]["loadavg_end"] = list(os.getloadavg())
    results["total_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, (json.dumps(results, indent=2) + "\n").encode())
    from .table import print_table

    print()
    if "compile" in results:
        compile_part.print_compile(results["compile"])
        print()
    print_table(results)
    if "audit" in results and "error" not in results["audit"]:
        audit_part.print_audit(results["audit"])
    print(f"\nwritten to {args.out}")
    return status


def _steps(quick: bool, wanted: list[str] | None) -> dict:
    from .env import gpu_present
    from .steps import bench_step, step_configs

    configs = step_configs(quick, gpu_present())
    if wanted is not None:
        have = [c[0] for c in configs]
        for name in wanted:
            if name not in have:
                print(f"[benchmark] step.{name}: not run on this backend / setting", flush=True)
        configs = [c for c in configs if c[0] in wanted]
    out = {}
    for key, name, shape, batch, steps, repeats, warmup, teacher in configs:
        print(f"[benchmark] step.{key} ...", flush=True)
        out[key] = bench_step(
            name, shape, batch, steps=steps, repeats=repeats, warmup=warmup, teacher=teacher
        )
        print(f"[benchmark]   {json.dumps(out[key])}", flush=True)
    return out


def _study(args: list[str], repeats: int) -> tuple[dict, int]:
    """The study section, and the exit status: 1 when a study run failed (the other sections'
    results are still written)."""
    from .reference_study import bench_reference

    try:
        out = study.bench_study(args, repeats=repeats)
    except study.StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return {"args": args, "error": str(e)}, 1
    out["pytorch_multiplied_out"] = bench_reference(study.resolve(args))
    return out, 0
