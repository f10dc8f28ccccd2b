"""Every GPU check of issue 9 in one run, for a lent accelerator with little time on it.

    python -m experiments.device_check --mnist-dir .devdata/mnist --out OUT_DIR [--quick]

1. `convs`: the vmapped CNN training step of a 50-member MNIST population, with XLA's
   convolutions and with patch-matrix products (`layers.patch_matmul_convolutions`), steps/s.
2. `single`: one MNIST class-0 run of the main job (original and retrain trained, CaMU, no
   relearning) from an empty compile cache, then the same command again with the warm
   persistent cache (models restored): the CaMU phase's seconds and compile seconds, cold and
   warm; a third run from another empty cache with XLA's GPU autotuning off.
3. `study`: the MNIST study `--forget-class all --seeds 0,1,2,3,4` (5 originals, 50 retrains,
   50 CaMU runs, 150 evaluations, 100 relearning checks) from an empty cache, wall seconds and
   its phases.

Each part runs in its own subprocess under its own timeout and writes its JSON as soon as it is
done, so a part that runs out of time leaves the others' figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(cmd, timeout, env=None, log=None):
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = 124, e.stdout or "", e.stderr or ""
        out = out.decode() if isinstance(out, bytes) else out
        err = err.decode() if isinstance(err, bytes) else err
    wall = time.perf_counter() - t0
    if log is not None:
        Path(log).write_text(f"$ {' '.join(cmd)}\nrc={rc} wall={wall:.1f}\n{out}\n{err}")
    return rc, wall, out, err


def _phases(workdir: Path) -> dict:
    try:
        results = json.loads((workdir / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return {
        p["phase"]: {"seconds": p["seconds"], "compile_seconds": p["compile_seconds"]}
        for p in results.get("phases", [])
    }


def convs(args, out: Path) -> dict:
    """Population training-step throughput with both convolution forms (in this process)."""
    import functools

    import jax
    import numpy as np

    from camu_jax import engine, sharding
    from camu_jax.models import create_model, init_variables, layers
    from camu_jax.steps import adam_l2, init_train_state, train_step

    members = args.members
    mesh = sharding.make_mesh(member_devices=1)
    model = create_model("cnn", num_classes=10)
    tx = adam_l2(1e-3)
    step = jax.vmap(functools.partial(train_step, model=model, tx=tx))
    rng = np.random.default_rng(0)
    variables = engine.stack(
        [init_variables(model, jax.random.key(s), (28, 28, 1)) for s in range(members)]
    )
    batch = sharding.shard_members(
        {
            "image": rng.random((members, 32, 28, 28, 1), np.float32),
            "label": rng.integers(0, 10, (members, 32)).astype(np.int32),
            "mask": np.ones((members, 32), np.float32),
        },
        mesh,
    )
    result = {"members": members, "batch": 32}
    for name, patch in (("xla", False), ("patch", True)):

        def run(state, batch, patch=patch):
            with layers.patch_matmul_convolutions(patch):
                return step(state, batch)

        fn = jax.jit(run, donate_argnums=0)
        state = jax.jit(jax.vmap(lambda v: init_train_state(v, tx)))(
            sharding.shard_members(variables, mesh)
        )
        t = time.perf_counter()
        state, _ = fn(state, batch)
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - t
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(args.steps):
                state, _ = fn(state, batch)
            jax.block_until_ready(state)
            times.append((time.perf_counter() - t) / args.steps)
        result[name] = {
            "compile_plus_first_s": compile_s,
            "step_ms_median": 1e3 * float(np.median(times)),
            "member_steps_per_s": members / float(np.median(times)),
        }
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.device_check")
    p.add_argument("--mnist-dir", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--only", default="convs,single,study")
    p.add_argument("--study-timeout", type=int, default=420)
    p.add_argument("--study-conv", default="", help="CAMU_POPULATION_CONVS for the study")
    p.add_argument("--members", type=int, default=50, help="population of the convs check")
    p.add_argument("--steps", type=int, default=50, help="steps per timing of the convs check")
    p.add_argument("--extra", default="", help="more main-job flags (local dry runs)")
    args = p.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    parts = args.only.split(",")
    summary: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="camu-device-"))
    data_dir = tmp / "tfds"
    base = [
        sys.executable,
        "-m",
        f"{__package__}.unlearn",
        "--no-progress",
        "--dataset",
        "mnist",
        "--manual-dir",
        args.mnist_dir,
        "--data-dir",
        str(data_dir),
    ]

    def save():
        (out / "device_check.json").write_text(json.dumps(summary, indent=2))

    if "convs" in parts:
        try:
            summary["convs"] = convs(args, out)
        except Exception as e:  # noqa: BLE001 - a failed part must not cost the others
            summary["convs"] = {"error": f"{type(e).__name__}: {e}"}
        save()
        print("convs", json.dumps(summary["convs"]), flush=True)

    if "single" in parts:
        wd = tmp / "single"
        single = {}
        for name, cache, env in (
            ("cold", tmp / "xla_single", {}),
            ("warm", tmp / "xla_single", {}),
            (
                "cold_no_autotune",
                tmp / "xla_single_na",
                {"XLA_FLAGS": "--xla_gpu_autotune_level=0"},
            ),
        ):
            cmd = [
                *base,
                "--workdir",
                str(wd),
                "--forget-class",
                "0",
                "--seeds",
                "0",
                "--no-relearn",
                "--xla-cache",
                str(cache),
            ]
            rc, wall, _, err = _run(cmd, 300, env, out / f"single_{name}.log")
            single[name] = {"rc": rc, "wall_s": wall, "phases": _phases(wd)}
            summary["single"] = single
            save()
            print("single", name, json.dumps(single[name]), flush=True)
            if rc != 0:
                break

    if "study" in parts:
        wd = tmp / "study"
        env = {"CAMU_POPULATION_CONVS": args.study_conv} if args.study_conv else {}
        cmd = [
            *base,
            "--workdir",
            str(wd),
            "--forget-class",
            "all",
            "--seeds",
            "0,1,2,3,4",
            "--xla-cache",
            str(tmp / "xla_study"),
        ]
        rc, wall, stdout, _ = _run(cmd, args.study_timeout, env, out / "study.log")
        summary["study"] = {"rc": rc, "wall_s": wall, "phases": _phases(wd)}
        try:
            results = json.loads((wd / "results.json").read_text())
            summary["study"]["summary"] = results.get("summary")
            (out / "study_results.json").write_text(json.dumps(results))
        except (OSError, ValueError):
            pass
        save()
        print(
            "study",
            json.dumps({k: v for k, v in summary["study"].items() if k != "summary"}),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
