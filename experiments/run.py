"""The main job's shell around the library's study (`camu_jax.study.run_study`): it loads the
data, builds the runs of a config, owns the work dir (lock, split files, `config.toml`,
`results.json` and the reports) and the checkpoint store, and prints each run's table.

The study itself (originals, retrains, every method, overlapped scoring, divergence records,
relearning, phase timings) is the notebook's `camu_jax.compare` too: both give the same
numbers from the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
from pathlib import Path

import jax
import numpy as np

from camu_jax import checkpointing, logs, sharding
from camu_jax.data.loading import load_dataset
from camu_jax.data.pipeline import DeviceData, input_spec_for
from camu_jax.data.splits import make_splits
from camu_jax.models import create_model
from camu_jax.relearning import RelearnConfig
from camu_jax.results import RUN_COLUMNS, TIME_COLUMNS, table
from camu_jax.study import BASELINES, UNLEARNING, Run, Store, folder_name, run_study
from camu_jax.training import TrainConfig
from camu_jax.versions import versions

from .configs import ExperimentConfig, to_toml
from .outputs import LOGS, check_output_paths
from .reporting import atomic_write_bytes, build_reports, remove_stale_temp_files


def _clean(x):
    """JSON-safe: NaN -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _mesh(config: ExperimentConfig):
    """All devices; every phase's batch checked on it before anything is loaded or written."""
    devices = jax.devices()
    members = 1 if config.population_size == 1 else len(devices)
    mesh = sharding.make_mesh(devices, member_devices=members)
    batches = [("", config.batch_size)] + [
        (f"{'CaMU' if name == 'camu' else name} ", m.batch_size)
        for name, m in config.method_configs().items()
    ]
    for phase, batch in batches:
        try:
            sharding.check_batch_size(batch, mesh)
        except ValueError as e:
            raise ValueError(f"{phase}{e}") from None
    return mesh


def run_experiment(config: ExperimentConfig, *, log=print) -> dict:
    """Runs the study of `config`; writes `config.toml`, the split files, `results.json` and
    the reports (atomically) into `config.workdir`, and every phase's step logs (per member:
    TensorBoard events and CSV, `camu_jax.logs`) into `<workdir>/logs/<phase>/<member>/`;
    returns the results dict.

    The work dir is locked (`checkpointing.lock_directory`) from before its first file is
    written until the end: a second run on it raises `checkpointing.DirectoryInUseError`
    naming this process."""
    config.validate()
    mesh = _mesh(config)
    main = jax.process_index() == 0  # process 0 alone reports and writes files
    log = log if main else lambda *_: None
    data = load_dataset(
        config.dataset,
        data_dir=config.data_dir,
        manual_dir=config.manual_dir,
        progress=config.progress and main,
    )
    model = create_model(config.model, num_classes=data.num_classes)
    spec = input_spec_for(config.dataset, config.model)
    train = DeviceData.put(data.train_images, data.train_labels, spec=spec, mesh=mesh)
    test = DeviceData.put(data.test_images, data.test_labels, spec=spec, mesh=mesh)
    runs = []
    for seed in config.seeds:
        for classes, forget in config.forget_specs():
            splits = make_splits(data.train_labels, forget, seed=seed, num_classes=data.num_classes)
            tag = "all" if classes is None else "-".join(map(str, classes))
            runs.append(Run(seed, splits, classes, f"{config.scenario}-{tag}-seed{seed}"))
    workdir = Path(config.workdir)
    store = checkpoint_store(
        config.checkpoint_dir, workdir, config.dataset, config.model, data, config.checkpoint_every
    )
    method_configs = config.method_configs()
    check_output_paths(
        workdir,
        store.root,
        (*BASELINES, *map(folder_name, method_configs), UNLEARNING),
        f"{store.prefix}-",
        [r.name for r in runs],
    )
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        if main:
            held.enter_context(checkpointing.lock_directory(workdir))
            remove_stale_temp_files(workdir, workdir / "splits")  # Left by a killed run.
            atomic_write_bytes(workdir / "config.toml", to_toml(config).encode())
            for run in runs:
                buf = io.BytesIO()
                np.savez(buf, **run.splits.to_arrays())
                atomic_write_bytes(workdir / "splits" / f"{run.name}.npz", buf.getvalue())
        train_config = TrainConfig(
            epochs=config.original_epochs,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        with logs.log_to(workdir / LOGS):
            record = _study(model, train, test, runs, config, data, train_config, store, log)
        entries = []
        for run, entry in zip(runs, record["runs"], strict=True):
            head = f"forget {entry['forget_class']} seed {entry['seed']}"
            # The times below the metrics, after a blank line: compiling and running apart.
            log(
                table([entry], RUN_COLUMNS, caption=f"{head}  sizes {entry['split_sizes']}")
                + "\n\n"
                + table([entry], TIME_COLUMNS, caption="times (s; RTE: Retrain's / the method's)")
            )
            out = {}
            for key, value in entry.items():
                out[key] = value
                if key == "split_sizes":
                    out["split_file"] = f"splits/{run.name}.npz"
                if key == "logs":  # relative to the work dir, as split_file
                    out[key] = {m: _relative(path, workdir) for m, path in value.items()}
            entries.append(out)
        results = _clean(
            {
                # The CaMU settings actually used, preset included.
                "config": dataclasses.asdict(
                    dataclasses.replace(config, camu=config.camu_config())
                ),
                "method_configs": record["method_configs"],
                "dataset": config.dataset,
                "scenario": config.scenario,
                "model": config.model,
                "devices": [str(d) for d in mesh.devices.flat],
                "mesh": dict(mesh.shape),
                # Every version that moves numbers: python, platform, processor, jax...
                "versions": versions(),
                "runs": entries,
                "summary": record["summary"],
                "phases": record["phases"],
            }
        )
        if main:
            _write(results, workdir)
    return results


def checkpoint_store(
    checkpoint_dir: str | None, workdir: Path, dataset: str, model: str, data, every: float
) -> Store:
    """Where a study's (or an audit's) models are checkpointed: `checkpoint_dir`, else
    `<workdir>/checkpoints`, named and identified by the dataset, the model and the training
    data's fingerprint, saved every `every` seconds."""
    return Store(
        root=Path(checkpoint_dir or workdir / "checkpoints"),
        prefix=f"{dataset}-{model}",
        identity={"dataset": dataset, "model": model, "train_data_sha256": data.train_fingerprint},
        checkpoint_every=every,
    )


def _relative(path: str, workdir: Path) -> str:
    try:
        return str(Path(path).relative_to(workdir))
    except ValueError:
        return str(path)


def _study(model, train, test, runs, config, data, train_config, store, log) -> dict:
    return run_study(
        model,
        train=train,
        test=test,
        runs=runs,
        methods=list(config.method_groups().values()),
        train_config=train_config,
        num_classes=data.num_classes,
        relearning=(
            RelearnConfig(
                train=dataclasses.replace(train_config, epochs=1), every=config.relearn_every
            )
            if config.relearn
            else None
        ),
        population_size=config.population_size,
        compile_ahead=config.compile_ahead,
        eval_workers=config.eval_workers,
        on_divergence="record" if config.on_divergence == "record" else "raise",
        store=store,
        progress=config.progress,
        log=log,
    )


def _write(results: dict, workdir: Path) -> None:
    atomic_write_bytes(workdir / "results.json", json.dumps(results, indent=2).encode())
    try:
        build_reports(results, workdir)
    except OSError as e:
        # The figures are safe in results.json; the reports can be made again from it.
        raise OSError(
            e.errno,
            f"{e.strerror}; results.json is written: rebuild the reports with "
            f"`python -m experiments.report {workdir}`",
            e.filename,
        ) from e
