"""The PyTorch port's per-run times, multiplied out to a study's counts: NOT a study run.

Timed once each on this machine, with the study's dataset and settings: one original-training
epoch on D and one retraining epoch on D_r of the study's first run (each multiplied by the
configured epochs), one CaMU run on that run's split (counterfactual construction + unlearning,
the reference's "time"), and one evaluation of one model: the reference's five accuracy passes
at batch 32 (D_r, D_f, test, test outside and inside the forgotten classes) plus the membership
attacks, which the port does not have, with the library's host code (`camu_jax.evaluation.score`,
what the study runs for every model). Then multiplied by the study's counts: originals = seeds,
retrains = CaMU runs = seeds x forget sets, evaluations = 3 x runs. The port has no relearning
check, so there is no relearning figure.
"""

from __future__ import annotations

import time

import numpy as np

from .env import sync_torch, torch_device

NOTE = (
    "multiplied out, not run: the PyTorch port's time for one original epoch, one retrain "
    "epoch (both x epochs), one CaMU run and one evaluation on this machine, x the study's counts"
)
EVAL_BATCH = 32  # the reference evaluates at batch 32


def _logits(model, dataset, device) -> np.ndarray:
    import torch

    from ..pytorch_reference.data import make_loader

    model.eval()
    with torch.no_grad():
        loader = make_loader(dataset, batch_size=1024, shuffle=False)
        return torch.cat([model(x.to(device))[0].cpu() for x, _ in loader]).numpy()


def _warm_up(sets: dict, *, model, classes: int, device: str) -> None:
    """Each piece once on 64 items, untimed: PyTorch's first calls of an operation cost more
    (allocator, kernel selection), which a study in one process pays once, not per run."""
    from torch.utils.data import Subset

    from ..pytorch_reference import camu, evaluate

    n = min(64, len(sets["unlearn"]), len(sets["sample"]))

    def head(name):
        return Subset(sets[name], range(n))

    _, trained = model("train", head("train"))
    camu.unlearn(
        trained,
        head("unlearn"),
        head("sample"),
        num_classes=classes,
        epochs=1,
        kl_lr=1e-4,
        impair_lr=1e-4,
        device=device,
    )
    evaluate.accuracy(trained, head("test"), batch_size=EVAL_BATCH, device=device)


def bench_reference(config, *, log=print) -> dict:
    """Times the port's pieces for the study of `config` (an `ExperimentConfig` of the CNN on
    MNIST-like data, as `study.resolve` checks) and multiplies them out."""
    import torch

    from camu_jax.data.loading import load_dataset
    from camu_jax.data.splits import make_splits
    from camu_jax.evaluation import score

    from ..pytorch_reference import camu, evaluate, models, train
    from ..pytorch_reference import data as tdata

    ds = load_dataset(
        config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir, progress=False
    )
    classes, spec = config.forget_specs()[0]
    seed = config.seeds[0]
    splits = make_splits(ds.train_labels, spec, seed=seed, num_classes=ds.num_classes)
    device = torch_device()
    height, _, channels = ds.image_shape
    # Writable copies of the labels: torch warns on the loader's read-only arrays.
    x, y, y_test = ds.train_images, np.array(ds.train_labels), np.array(ds.test_labels)
    unlearn_rows = np.tile(splits.forget, splits.repeat)
    # Float tensors made before any timer starts (the reference converts per item, slower).
    sets = {
        "train": tdata.tensor_dataset(x, y),
        "remain": tdata.tensor_dataset(x[splits.remain], y[splits.remain]),
        "forget": tdata.tensor_dataset(x[splits.forget], y[splits.forget]),
        "unlearn": tdata.tensor_dataset(x[unlearn_rows], y[unlearn_rows]),
        "sample": tdata.tensor_dataset(x[splits.sample], y[splits.sample]),
        "test": tdata.tensor_dataset(ds.test_images, y_test),
    }

    def train_epoch(name, dataset=None):
        torch.manual_seed(seed)
        model = models.CNN(num_classes=ds.num_classes, in_channels=channels, image_size=height)
        generator = torch.Generator().manual_seed(seed)
        dataset = sets[name] if dataset is None else dataset
        loader = tdata.make_loader(dataset, batch_size=config.batch_size, generator=generator)
        start = time.perf_counter()
        train.train(
            model,
            loader,
            epochs=1,
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
            device=device,
        )
        sync_torch(device)
        return time.perf_counter() - start, model

    log(f"[benchmark] study.pytorch: {config.dataset}, seed {seed}, forget {classes}")
    _warm_up(sets, model=train_epoch, classes=ds.num_classes, device=device)
    original_epoch_s, original = train_epoch("train")
    retrain_epoch_s, _ = train_epoch("remain")
    c = config.camu_config()
    start = time.perf_counter()
    unlearned = camu.unlearn(
        original,
        sets["unlearn"],
        sets["sample"],
        num_classes=ds.num_classes,
        epochs=c.epochs,
        kl_lr=c.kl_lr,
        impair_lr=c.impair_lr,
        device=device,
        seed=seed,
        batch_size=c.batch_size,
    )
    sync_torch(device)
    camu_s = time.perf_counter() - start

    others = [k for k in range(ds.num_classes) if k not in (classes or ())]
    passes = [
        ("remain", None),
        ("forget", None),
        ("test", None),
        ("test", others if classes else None),
        ("test", list(classes) if classes else None),
    ]
    start = time.perf_counter()
    for name, output_label in passes:
        evaluate.accuracy(
            unlearned, sets[name], batch_size=EVAL_BATCH, device=device, output_label=output_label
        )
    sync_torch(device)
    forward_s = time.perf_counter() - start
    train_logits = _logits(unlearned, sets["train"], device)
    test_logits = _logits(unlearned, sets["test"], device)
    start = time.perf_counter()
    score(
        train_logits=train_logits,
        train_labels=y,
        test_logits=test_logits,
        test_labels=y_test,
        splits=splits,
        forget_classes=classes,
        seed=seed,
    )
    attacks_s = time.perf_counter() - start

    epochs = config.original_epochs
    per_run = {
        "original_epoch_s": original_epoch_s,
        "original_s": original_epoch_s * epochs,
        "retrain_epoch_s": retrain_epoch_s,
        "retrain_s": retrain_epoch_s * epochs,
        "camu_s": camu_s,
        "evaluation_forward_s": forward_s,
        "evaluation_attacks_s": attacks_s,
        "evaluation_s": forward_s + attacks_s,
    }
    runs = len(config.seeds) * len(config.forget_specs())
    counts = {
        "originals": len(config.seeds),
        "retrains": runs,
        "camu": runs,
        "evaluations": 3 * runs,
    }
    out = {
        "multiplied_out": True,
        "note": NOTE,
        "timed_on": {
            "seed": seed,
            "forget_classes": None if classes is None else list(classes),
            "split_sizes": {**splits.sizes(), "test": ds.num_test},
        },
        "torch_device": device,
        "torch_threads": torch.get_num_threads(),
        "per_run": per_run,
        "counts": counts,
        "training_s": counts["originals"] * per_run["original_s"]
        + counts["retrains"] * per_run["retrain_s"],
        "unlearning_s": counts["camu"] * camu_s,
        "evaluation_s": counts["evaluations"] * per_run["evaluation_s"],
        "relearning_s": None,  # the port has no relearning check
    }
    out["phases_s"] = out["training_s"] + out["unlearning_s"] + out["evaluation_s"]
    return out
