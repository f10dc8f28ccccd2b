"""CaMU unlearning end to end: counterfactual construction, then the two-optimizer epochs.

Runs as a population on the loop engine (`camu_jax.engine`): one member per (seed, forget
set), each with its own frozen original, counterfactuals and index plans; `unlearn` is a
population of one. Counterfactuals are built once (pairing and labels on the host, per-item
noise from a key) and the frozen original's embeddings of them are computed once in eval mode,
for every member in one batched pass; so are its embeddings of D_s when inputs are not
augmented. The reference recomputes both teacher passes every step; the values are the same.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh
from tqdm.auto import tqdm

from camu_jax import engine, sharding
from camu_jax.counterfactual import make_counterfactuals
from camu_jax.data.pipeline import (
    DeviceData,
    InputSpec,
    item_keys,
    preprocess,
    shuffled_batches,
)
from camu_jax.data.splits import Splits
from camu_jax.evaluation import predict
from camu_jax.steps import (
    CamuCoefficients,
    adam_l2,
    apply_model,
    camu_step,
    check_number,
    init_camu_state,
)

MNIST_LIKE = ("digits", "mnist", "fashion_mnist")
CIFAR_LIKE = ("cifar10", "cifar100")


@dataclasses.dataclass(frozen=True)
class CamuConfig:
    """Hyperparameters of CaMU unlearning (defaults: the reference's MNIST class preset)."""

    epochs: int = 2  # passes over D_f
    kl_lr: float = 4e-4  # step A (L_rep), the reference's KL_LR
    impair_lr: float = 1e-3  # step B (L_out), the reference's IMPAIR_LR
    batch_size: int = 32  # D_f items and D_s items per step (each)
    weight_decay: float = 1e-4  # coupled L2 of both Adam optimizers
    coefficients: CamuCoefficients = CamuCoefficients()

    def validate(self) -> None:
        """Raises ValueError naming the first bad value: epochs and batch size must be positive
        integers, learning rates positive and finite, weight decay and coefficients finite and
        non-negative. (Zero epochs would return the original model as "unlearned".)"""
        for name in ("epochs", "batch_size"):
            check_number(f"CaMU {name}", getattr(self, name), integer=True)
        for name in ("kl_lr", "impair_lr"):
            check_number(f"CaMU {name}", getattr(self, name))
        check_number("CaMU weight_decay", self.weight_decay, positive=False)
        self.coefficients.validate()


# The reference's per-scenario presets (camu_reference.md, section 4).
_PRESETS = {
    ("mnist", "random"): CamuConfig(epochs=10, kl_lr=4e-4, impair_lr=5e-4),
    ("mnist", "class"): CamuConfig(epochs=2, kl_lr=4e-4, impair_lr=1e-3),
    ("cifar", "random"): CamuConfig(epochs=10, kl_lr=1e-5, impair_lr=1e-4),
    ("cifar", "class"): CamuConfig(epochs=2, kl_lr=1e-5, impair_lr=5e-5),
}


def camu_preset(dataset: str, scenario: str) -> CamuConfig:
    """The reference preset for a dataset and scenario (`class` or `random`)."""
    family = "mnist" if dataset in MNIST_LIKE else "cifar" if dataset in CIFAR_LIKE else None
    if family is None:
        raise ValueError(
            f"no CaMU preset for dataset {dataset!r}; allowed: {MNIST_LIKE + CIFAR_LIKE}"
        )
    if scenario not in ("class", "random"):
        raise ValueError(f"unknown scenario {scenario!r}; allowed: class, random")
    return _PRESETS[(family, scenario)]


def camu_program(model: nn.Module, config: CamuConfig, spec: InputSpec, mesh: Mesh):
    """CaMU double steps: member data `forget_rows`, `sample_rows`, `y_cf`, `z0_cf`, `z0_s`
    (or the `teacher` when inputs are augmented), keys `aug_key`, `step_key`; plan rows
    `f_ids`, `f_mask`, `s_ids`, `s_mask`; the state starts as a copy of the frozen original."""
    kl_tx = adam_l2(config.kl_lr, config.weight_decay)
    ce_tx = adam_l2(config.impair_lr, config.weight_decay)
    step = functools.partial(
        camu_step, model=model, kl_tx=kl_tx, ce_tx=ce_tx, coefficients=config.coefficients
    )

    def make_batch(state, shared, member, row):
        images, labels = shared
        fi, si = row["f_ids"], row["s_ids"]
        aug_key = jax.random.wrap_key_data(member["aug_key"])
        f_rows = member["forget_rows"][fi]
        x_f = preprocess(
            images[f_rows], spec, augment_keys=item_keys(aug_key, fi) if spec.augment else None
        )
        s_rows = member["sample_rows"][si]
        s_keys = None
        if spec.augment:
            step_key = jax.random.wrap_key_data(member["step_key"])
            s_keys = item_keys(jax.random.fold_in(step_key, state.step), si)
        x_s = preprocess(images[s_rows], spec, augment_keys=s_keys)
        if spec.augment:  # Fresh augmentation every step: the teacher must see it too.
            teacher = member["teacher"]
            _, z0_s, _ = apply_model(
                model, teacher["params"], teacher["batch_stats"], x_s, train=False
            )
        else:
            z0_s = member["z0_s"][si]
        batch = {
            "x_f": x_f,
            "x_s": x_s,
            "y_s": labels[s_rows],
            "y_cf": member["y_cf"][fi],
            "z0_s": z0_s,
            "z0_cf": member["z0_cf"][fi],
            "mask_f": row["f_mask"],
            "mask_s": row["s_mask"],
        }
        return sharding.constrain_batch(batch, mesh)

    init = functools.partial(init_camu_state, kl_tx=kl_tx, ce_tx=ce_tx)
    return engine.Program(init=init, step=step, make_batch=make_batch)


@functools.lru_cache(maxsize=16)
def _engine(model, config, spec, mesh, use_scan):
    # One engine per (model, config): a study's waves and calls reuse its compiled programs.
    return engine.Engine(camu_program(model, config, spec, mesh), mesh, use_scan=use_scan)


def member_keys(seed: int) -> dict[str, np.ndarray]:
    """A run's keys (as key data): counterfactual noise, fixed augmentations, step keys."""
    noise, aug, step = jax.random.split(jax.random.key(seed), 3)
    return {
        k: np.asarray(jax.random.key_data(v))
        for k, v in zip(("noise", "aug", "step"), (noise, aug, step), strict=True)
    }


def epoch_plan(n_forget: int, n_sample: int, batch_size: int, seed: int, epoch: int):
    """One epoch of the reference's `zip` of a shuffled D_f (counterfactual) loader and a
    shuffled D_s loader: `zip` stops at the shorter one."""
    rng = np.random.default_rng([seed, 4, epoch])
    f_ids, f_mask = shuffled_batches(n_forget, batch_size, rng)
    s_ids, s_mask = shuffled_batches(n_sample, batch_size, rng)
    steps = min(len(f_ids), len(s_ids))
    return {
        "f_ids": f_ids[:steps],
        "f_mask": f_mask[:steps],
        "s_ids": s_ids[:steps],
        "s_mask": s_mask[:steps],
    }


def unlearn_population(
    model: nn.Module,
    originals: Sequence[dict],
    *,
    data: DeviceData,
    splits: Sequence[Splits],
    seeds: Sequence[int],
    num_classes: int,
    config: CamuConfig,
    names: Sequence[str] | None = None,
    population_size: int | None = None,
    chunk_steps: int = 250,
    use_scan: bool | None = None,
    progress: bool = True,
) -> list[tuple[dict, dict]]:
    """Runs CaMU for every member (frozen original `originals[i]`, `splits[i]`, `seeds[i]`),
    at most `population_size` at a time (default all); returns per member `(variables, info)`.

    info: `seconds` (the member's share of its wave: counterfactual construction +
    unlearning, compile included, the reference's "time"), `construct_seconds`,
    `compile_seconds`, `losses` (per chunk means), `steps`, `counterfactual_labels`,
    `counterfactual_pair`.
    """
    config.validate()
    sharding.check_batch_size(config.batch_size, data.mesh)
    count = len(originals)
    names = list(names or [f"camu {i}" for i in range(count)])
    size = engine.wave_size(population_size, count, data.mesh)
    run = _engine(model, config, data.spec, data.mesh, use_scan)
    # Widths and chunk length from every member of the phase, not of a wave: one shape, one
    # compile, for all waves.
    # (Rounded up, so calls with similar set sizes share them too.)
    nf = -(-max(sp.forget.size * sp.repeat for sp in splits) // 512) * 512
    ns = -(-max(sp.sample.size for sp in splits) // 512) * 512
    steps = max(
        min(
            -(-sp.forget.size * sp.repeat // config.batch_size),
            -(-sp.sample.size // config.batch_size),
        )
        for sp in splits
    )
    shape = (nf, ns, max(1, min(chunk_steps, steps)))
    results: list = [None] * count
    for wave in engine.waves(count, size):
        outs = _unlearn_wave(
            run,
            model,
            [originals[i] for i in wave],
            data,
            [splits[i] for i in wave],
            [seeds[i] for i in wave],
            [names[i] for i in wave],
            size,
            shape,
            num_classes,
            config,
            progress,
        )
        for i, out in zip(wave, outs, strict=True):
            results[i] = out
    return results


def _unlearn_wave(
    run,
    model,
    originals,
    data,
    splits,
    seeds,
    names,
    size,
    shape,
    num_classes,
    config,
    progress,
):
    timer = engine.Timer()
    nf, ns, chunk = shape
    mesh, real, b = data.mesh, len(originals), config.batch_size
    pad = functools.partial(engine.pad_members, size=size)
    originals, splits, seeds, names = pad(originals), pad(splits), pad(seeds), pad(names)
    forget = [np.tile(s.forget, s.repeat).astype(np.int32) for s in splits]
    sample = [s.sample.astype(np.int32) for s in splits]
    cfs = [
        make_counterfactuals(
            np.random.default_rng([seed, 6]),
            forget_labels=data.host_labels[f],
            sample_labels=data.host_labels[s],
            num_classes=num_classes,
        )
        for seed, f, s in zip(seeds, forget, sample, strict=True)
    ]
    keys = [member_keys(seed) for seed in seeds]

    def padded(arrays, width):
        out = np.zeros((size, width), np.int32)
        for j, a in enumerate(arrays):
            out[j, : len(a)] = a
        return out

    teacher = sharding.shard_members(_stack(originals), mesh)
    cf_rows = padded([s[cf.pair] for s, cf in zip(sample, cfs, strict=True)], nf)
    aug_keys = np.stack([k["aug"] for k in keys])
    # x_cf of item i: the paired sample's fixed augmentation (key of item i) plus its noise.
    member = {
        "forget_rows": padded(forget, nf),
        "sample_rows": padded(sample, ns),
        "y_cf": padded([cf.labels for cf in cfs], nf),
        "aug_key": aug_keys,
        "step_key": np.stack([k["step"] for k in keys]),
    }
    member = sharding.shard_members(member, mesh)
    member["z0_cf"] = predict(
        model,
        teacher,
        data,
        cf_rows,
        embedding=True,
        aug_keys=aug_keys if data.spec.augment else None,
        noise_keys=np.stack([k["noise"] for k in keys]),
        fetch=False,
        width=nf,
    )
    if data.spec.augment:
        member["teacher"] = teacher
    else:
        member["z0_s"] = predict(
            model, teacher, data, padded(sample, ns), embedding=True, fetch=False, width=ns
        )
    jax.block_until_ready(member)
    construct_seconds = timer.seconds

    state = run.init(_stack(originals))
    shared = (data.images, data.labels)
    steps = [min(-(-len(f) // b), -(-len(s) // b)) for f, s in zip(forget, sample, strict=True)]
    losses = [[] for _ in range(real)]
    bar = tqdm(
        total=config.epochs * sum(steps[:real]),
        desc="camu",
        unit="step",
        disable=not progress or jax.process_index() != 0,  # process 0 reports
        leave=False,
    )
    for epoch in range(config.epochs):
        plans = []
        for j in range(size):
            plan = epoch_plan(len(forget[j]), len(sample[j]), b, seeds[j], epoch)
            if j >= real:
                plan = {k: np.zeros_like(v) for k, v in plan.items()}
            plans.append(plan)
        plan = engine.pad_steps(engine.stack_plans(plans), chunk)
        for lo in range(0, plan["f_ids"].shape[1], chunk):
            part = {k: v[:, lo : lo + chunk] for k, v in plan.items()}
            state, metrics = run(state, shared, member, part)
            engine.check_finite(metrics, names, f"camu epoch {epoch + 1}", state)
            for j in range(real):
                means = engine.chunk_means(metrics, ("loss_rep", "loss_out"), j)
                if means:
                    losses[j].append(means)
            bar.update(int(np.asarray(metrics["active"], bool)[:, :real].sum()))
    bar.close()
    host = engine.unstack({"params": state.params, "batch_stats": state.batch_stats}, real)
    share = timer.seconds / real
    return [
        (
            host[j],
            {
                "seconds": share,
                "construct_seconds": construct_seconds / real,
                "compile_seconds": timer.compile_seconds / real,
                "steps": config.epochs * steps[j],
                "losses": losses[j],
                "counterfactual_labels": cfs[j].labels,
                "counterfactual_pair": cfs[j].pair,
            },
        )
        for j in range(real)
    ]


def unlearn(
    model: nn.Module,
    original: dict,
    *,
    data: DeviceData,
    splits: Splits,
    num_classes: int,
    config: CamuConfig,
    seed: int,
    **kwargs,
) -> tuple[dict, dict]:
    """Runs CaMU from the frozen `original` (never modified); `unlearn_population` with one
    member. Returns `(variables, info)`."""
    ((out, info),) = unlearn_population(
        model,
        [original],
        data=data,
        splits=[splits],
        seeds=[seed],
        num_classes=num_classes,
        config=config,
        **kwargs,
    )
    return out, info


def _stack(trees):
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)
