"""Eval-mode forward passes over populations: the one place models are applied to rows of a
device-resident split outside a training step.

`predict` gives logits or embeddings of any number of models (a leading member axis) on rows
of a split, one compiled program per shape; `predict_logits` those of one model, checked
finite. Both evaluation (`camu_jax.evaluation`) and the methods (teacher outputs, CaMU's
counterfactual embeddings, relearning) use them, so this module sits below both.
`map_rows` is the padded-rows loop these passes share with other per-row programs (the
boundary methods' FGSM labels).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from camu_jax import keys as host_keys
from camu_jax import sharding
from camu_jax.counterfactual import counterfactual_inputs
from camu_jax.data.pipeline import DeviceData, InputSpec, item_keys, preprocess
from camu_jax.models import apply_model, layers

# Images per forward call over all members: bounds activation memory while keeping calls few.
IMAGES_PER_CALL = 32768


def map_rows(
    fn: Callable[[jax.Array, jax.Array], jax.Array],
    rows: np.ndarray,
    mesh: Mesh,
    *,
    batch: int,
    images_per_call: int,
    width: int | None = None,
) -> list[jax.Array]:
    """`fn(rows, ids)` over `[P, n]` host rows of a split, in calls of `[P, b]` rows (sharded
    over members and the batch): `b` is the largest multiple of the mesh's data devices at
    most `batch` and `images_per_call // P` (at least one row per device), and the rows are
    padded with row 0 to a multiple of `b` at least `width` wide; `ids` are the positions in
    `rows`. Returns the calls' outputs (device arrays `[P, b, ...]`), in order.

    One call shape whatever `n` is: rows travel per call, not as a table of every row."""
    rows = np.asarray(rows, np.int32)
    members, n = rows.shape
    step = sharding.data_devices(mesh)
    bs = max(step, min(batch, images_per_call // members) // step * step)
    width = -(-max(n, width or 1, 1) // bs) * bs
    table = np.zeros((members, width), np.int32)
    table[:, :n] = rows
    sync = sharding.needs_sync(mesh)
    outs = []
    for lo in range(0, width, bs):
        ids = np.broadcast_to(np.arange(lo, lo + bs, dtype=np.int32), (members, bs))
        chunk = sharding.shard_members(
            {"rows": table[:, lo : lo + bs], "ids": ids}, mesh, batch=True
        )
        if sync:  # fake CPU devices can deadlock in a collective unless each call is waited for
            jax.block_until_ready(outs)
        outs.append(fn(chunk["rows"], chunk["ids"]))
    return outs


def zero_keys(members: int) -> np.ndarray:
    """`[members]` key data of `jax.random.key(0)`'s shape, all zero (an unused key)."""
    return np.zeros((members, *host_keys.KEY_SHAPE), np.uint32)


@functools.lru_cache(maxsize=32)
def _forward(model: nn.Module, spec: InputSpec, mesh, embedding: bool, augment: bool):
    def one(variables, images, rows, ids, aug_key, noise_key, noise_scale):
        keys = item_keys(jax.random.wrap_key_data(aug_key), ids) if augment else None
        x = preprocess(images[rows], spec, augment_keys=keys)
        noisy = counterfactual_inputs(
            jax.random.wrap_key_data(noise_key), item_ids=ids, sample_inputs=x
        )
        x = x + noise_scale * (noisy - x)  # one program for plain and counterfactual inputs
        with layers.patch_matmul_convolutions(False):  # read when traced
            logits, emb, _ = apply_model(
                model, variables["params"], variables["batch_stats"], x, train=False
            )
        return emb if embedding else logits

    vmapped = sharding.vmap_members(one, mesh, (0, None, 0, 0, 0, 0, None))
    # XLA's own convolutions whatever the member count and layer (not `engine.member_program`'s
    # forms, nor a single model's `layers.patch_form_wins`). XLA still
    # compiles each member count on its own, so a model's logits differ between counts by
    # float32 rounding (4e-8 on an untrained digits CNN, 1 vs 3 members): accuracies agree
    # unless two logits tie that closely, a fitted attack can move (1 point of MIA there).
    return jax.jit(vmapped)


def predict(
    model: nn.Module,
    variables: dict,
    data: DeviceData,
    rows: np.ndarray | None = None,
    *,
    embedding: bool = False,
    aug_keys: np.ndarray | None = None,
    noise_keys: np.ndarray | None = None,
    fetch: bool = True,
    width: int | None = None,
):
    """Eval-mode outputs of a population of models.

    Args:
      variables: `{'params', 'batch_stats'}` stacked along a leading member axis `[P, ...]`.
      data: the split on device.
      rows: `[P, n]` rows of `data` per member (default: every row, for every member).
      embedding: return embeddings `[P, n, d]` instead of logits `[P, n, classes]`.
      aug_keys: `[P]` key data: item i (position in `rows`) gets the fixed augmentation
        `fold_in(aug_key, i)` (the counterfactual construction); default no augmentation.
      noise_keys: `[P]` key data: item i gets the counterfactual noise of id i added.
      fetch: return host numpy `[P, n, ...]` (default), or device arrays padded to a multiple
        of the batch at least `width` wide (rows past `n` are padding): a fixed `width` keeps
        their shape, and so every program they enter, the same for any `n` up to it.

    Batches are padded to one size (`map_rows`, at most 1024 rows per member and
    `IMAGES_PER_CALL` in all), so one compile serves every call with the same member count,
    whatever the number of rows.
    """
    mesh = data.mesh
    members = jax.tree.leaves(variables)[0].shape[0]
    if rows is None:
        rows = np.broadcast_to(np.arange(data.size, dtype=np.int32), (members, data.size))
    rows = np.asarray(rows, np.int32)
    n = rows.shape[1]
    run = _forward(model, data.spec, mesh, embedding, aug_keys is not None)
    zero = zero_keys(members)
    keys = sharding.shard_members(
        {
            "aug": zero if aug_keys is None else np.asarray(aug_keys),
            "noise": zero if noise_keys is None else np.asarray(noise_keys),
        },
        mesh,
    )
    scale = np.float32(0.0 if noise_keys is None else 1.0)
    outs = map_rows(
        lambda r, ids: run(variables, data.images, r, ids, keys["aug"], keys["noise"], scale),
        rows,
        mesh,
        batch=1024,
        images_per_call=IMAGES_PER_CALL,
        width=width,
    )
    if not fetch:
        return jnp.concatenate(outs, axis=1)
    return np.concatenate(sharding.fetch(outs), axis=1)[:, :n]


def predict_logits(
    model: nn.Module, variables: dict, data: DeviceData, rows=None, *, name: str = "the model"
) -> np.ndarray:
    """Eval-mode logits `[n, classes]` of ONE model on `data` (default every row); raises
    FloatingPointError naming `name` on a non-finite logit (`check_logits`)."""
    stacked = jax.tree.map(lambda x: jnp.asarray(x)[None], variables)
    logits = predict(model, stacked, data, None if rows is None else np.asarray(rows)[None])[0]
    check_logits(logits, name=name, variables=variables)
    return logits


def check_logits(logits: np.ndarray, *, name: str, variables: dict, rows=None) -> None:
    """Raises FloatingPointError, naming `name`, when a logit is NaN or inf: no metric means
    anything then, and finite but huge parameters (a learning rate far too high) show up only
    here."""
    bad, first = nonfinite_rows(logits)
    if bad:
        first = first if rows is None else int(np.asarray(rows)[first])
        raise nonfinite_error(name, bad, len(logits), first, variables)


def nonfinite_rows(logits: np.ndarray) -> tuple[int, int]:
    """How many rows of `logits` hold a NaN or inf, and the first of them."""
    bad = ~np.isfinite(logits).all(axis=-1)
    return int(bad.sum()), int(np.argmax(bad))


def nonfinite_error(name: str, bad: int, total: int, first: int, variables: dict):
    """The FloatingPointError of a model `name` whose logits are non-finite on `bad` of `total`
    rows (`first` the first of them), with its largest |parameter|."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(variables) if np.size(x)]
    largest = max(float(np.abs(x).max()) for x in leaves)
    return FloatingPointError(
        f"{name} gives non-finite logits on {bad} of {total} images (first: row {first}); its "
        f"largest |parameter| is {largest:.3g} (a learning rate far too high?)"
    )
