"""CaMU unlearning end to end: counterfactual construction, then the two-optimizer epochs.

Counterfactuals are built once (pairing, labels, per-item noise) and the frozen original's
embeddings of them are computed once in eval mode; so are its embeddings of D_s when inputs are
not augmented. The reference recomputes both teacher passes every step; the values are the same.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh
from tqdm.auto import tqdm

from camu_jax import sharding
from camu_jax.counterfactual import counterfactual_inputs, make_counterfactuals
from camu_jax.data.pipeline import (
    InputSpec,
    item_keys,
    pad_to_batches,
    preprocess,
    shuffled_batches,
)
from camu_jax.data.splits import Splits
from camu_jax.steps import (
    CamuCoefficients,
    adam_l2,
    apply_model,
    camu_step,
    check_number,
    init_camu_state,
)
from camu_jax.training import (
    StepRunner,
    all_finite,
    any_real_example,
    check_finite,
    check_finite_state,
    chunk_means,
    pad_plan,
    state_variables,
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


def _embed(model, variables, images, rows, spec, mesh, *, aug_key, noise_key, noise, bs=1024):
    """Eval-mode embeddings of `images[rows]`, item i augmented with the fixed key of item i and
    plus its counterfactual noise times `noise` (1.0 for x_cf, 0.0 for plain inputs)."""
    rows_dev = sharding.replicate(np.asarray(rows, np.int32), mesh)
    bs = max(bs - bs % mesh.devices.size, mesh.devices.size)
    ids, _ = pad_to_batches(np.arange(len(rows), dtype=np.int32), bs)
    scale = jnp.float32(noise)
    out = [
        _embed_batch(model, spec)(
            variables, images, rows_dev, aug_key, noise_key, scale, sharding.shard_batch(i, mesh)
        )
        for i in ids
    ]
    return jnp.concatenate(out)[: len(rows)]


@functools.lru_cache(maxsize=16)
def _embed_batch(model: nn.Module, spec: InputSpec):
    @jax.jit
    def run(variables, images, rows, aug_key, noise_key, scale, ids):
        keys = item_keys(aug_key, ids) if spec.augment else None
        x = preprocess(images[rows[ids]], spec, augment_keys=keys)
        x = x + scale * (counterfactual_inputs(noise_key, item_ids=ids, sample_inputs=x) - x)
        _, emb, _ = apply_model(
            model, variables["params"], variables["batch_stats"], x, train=False
        )
        return emb

    return run


def make_camu_runner(
    model: nn.Module, config: CamuConfig, spec: InputSpec, mesh: Mesh, use_scan=None
):
    """CaMU double steps over device-resident data: consts `(teacher, data, key)`, plan
    `(f_ids, f_mask, s_ids, s_mask)`, each `[k, batch]`. Returns `(runner, kl_tx, ce_tx)`."""
    kl_tx = adam_l2(config.kl_lr, config.weight_decay)
    ce_tx = adam_l2(config.impair_lr, config.weight_decay)
    step = functools.partial(
        camu_step, model=model, kl_tx=kl_tx, ce_tx=ce_tx, coefficients=config.coefficients
    )

    def make_batch(state, consts, xs):
        teacher, data, key = consts
        fi, fm, si, sm = xs
        f_rows = data["forget_rows"][fi]
        x_f = preprocess(
            data["images"][f_rows],
            spec,
            augment_keys=item_keys(data["aug_key"], fi) if spec.augment else None,
        )
        s_rows = data["sample_rows"][si]
        s_keys = item_keys(jax.random.fold_in(key, state.step), si) if spec.augment else None
        x_s = preprocess(data["images"][s_rows], spec, augment_keys=s_keys)
        if spec.augment:  # Fresh augmentation every step: the teacher must see it too.
            _, z0_s, _ = apply_model(
                model, teacher["params"], teacher["batch_stats"], x_s, train=False
            )
        else:
            z0_s = data["z0_s"][si]
        batch = {
            "x_f": x_f,
            "x_s": x_s,
            "y_s": data["labels"][s_rows],
            "y_cf": data["y_cf"][fi],
            "z0_s": z0_s,
            "z0_cf": data["z0_cf"][fi],
            "mask_f": fm,
            "mask_s": sm,
        }
        return sharding.constrain_batch(batch, mesh)

    runner = StepRunner(step, make_batch, mesh, active_fn=any_real_example, use_scan=use_scan)
    return runner, kl_tx, ce_tx


def unlearn(
    model: nn.Module,
    original: dict,
    *,
    images: jax.Array,
    labels: jax.Array,
    splits: Splits,
    num_classes: int,
    spec: InputSpec,
    mesh: Mesh,
    config: CamuConfig,
    seed: int,
    chunk_steps: int = 250,
    use_scan: bool | None = None,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Runs CaMU from the original model; returns `(variables, info)`.

    Args:
      original: the frozen original `{'params', 'batch_stats'}` (never modified).
      images, labels: the whole training split on device (`sharding.replicate`).
      splits: D_f, D_r, D_s indices; D_f is repeated `splits.repeat` times.

    info: `seconds` (counterfactual construction + unlearning, compile included, the
    reference's "time"), `construct_seconds`, `losses` (per chunk means), `steps`.
    """
    config.validate()
    sharding.check_batch_size(config.batch_size, mesh)
    t0 = time.perf_counter()
    cf_key, aug_key, step_key = jax.random.split(jax.random.key(seed), 3)
    forget_rows = np.tile(splits.forget, splits.repeat).astype(np.int32)
    sample_rows = splits.sample.astype(np.int32)
    host_labels = np.asarray(jax.device_get(labels))
    cf = jax.jit(make_counterfactuals, static_argnames="num_classes")(
        cf_key,
        forget_labels=jnp.asarray(host_labels[forget_rows]),
        sample_labels=jnp.asarray(host_labels[sample_rows]),
        num_classes=num_classes,
    )
    cf_rows = sample_rows[np.asarray(cf.pair)]
    # x_cf for item i is the paired sample's fixed augmentation (key of item i) plus its noise.
    embed = functools.partial(
        _embed,
        model,
        original,
        images,
        spec=spec,
        mesh=mesh,
        aug_key=aug_key,
        noise_key=cf.noise_key,
    )
    z0_cf = embed(cf_rows, noise=1.0)
    data = {
        "images": images,
        "labels": labels,
        "forget_rows": sharding.replicate(forget_rows, mesh),
        "sample_rows": sharding.replicate(sample_rows, mesh),
        "y_cf": cf.labels,
        "z0_cf": z0_cf,
        "z0_s": None if spec.augment else embed(sample_rows, noise=0.0),
        "aug_key": aug_key,
    }
    jax.block_until_ready(data)
    construct_seconds = time.perf_counter() - t0

    run, kl_tx, ce_tx = make_camu_runner(model, config, spec, mesh, use_scan)
    state = sharding.replicate(init_camu_state(original, kl_tx, ce_tx), mesh)
    n_f, n_s, b = len(forget_rows), len(sample_rows), config.batch_size
    steps = min(-(-n_f // b), -(-n_s // b))  # `zip` of the two loaders
    chunk = max(1, min(chunk_steps, steps))
    losses = []
    bar = tqdm(
        total=config.epochs * steps, desc="camu", unit="step", disable=not progress, leave=False
    )
    for epoch in range(config.epochs):
        rng = np.random.default_rng([seed, 4, epoch])
        f_ids, f_mask = shuffled_batches(n_f, b, rng)
        s_ids, s_mask = shuffled_batches(n_s, b, rng)
        plan = pad_plan((f_ids[:steps], f_mask[:steps], s_ids[:steps], s_mask[:steps]), chunk)
        for lo in range(0, len(plan[0]), chunk):
            part = tuple(p[lo : lo + chunk] for p in plan)
            state, metrics = run(state, (original, data, step_key), part)
            metrics, finite = jax.device_get((metrics, all_finite(state_variables(state))))
            check_finite(metrics, f"camu epoch {epoch + 1}")
            check_finite_state(finite, state_variables(state), f"camu epoch {epoch + 1}")
            losses.append(chunk_means(metrics, ("loss_rep", "loss_out")))
            bar.update(min(lo + chunk, steps) - min(lo, steps))
            bar.set_postfix(epoch=epoch + 1, **{k: f"{v:.4f}" for k, v in losses[-1].items()})
    variables = jax.block_until_ready(state_variables(state))
    bar.close()
    seconds = time.perf_counter() - t0
    info = {
        "seconds": seconds,
        "construct_seconds": construct_seconds,
        "steps": config.epochs * steps,
        "losses": losses,
        "counterfactual_labels": np.asarray(cf.labels),
        "counterfactual_pair": np.asarray(cf.pair),
    }
    return variables, info
