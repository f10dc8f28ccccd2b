"""SSD, Selective Synaptic Dampening (Foster, Schoepf and Brintrup, AAAI 2024, arXiv 2308.07707).

No training: the diagonal Fisher information (the squared gradient of the cross-entropy,
per parameter) of the original model over the training data D and over D_f picks the
parameters D_f matters much more to, and shrinks them:

    selected  = I_f > alpha * I_D
    theta    <- theta * min(lambda * I_D / I_f, 1)   where selected (untouched elsewhere)

following the official code (`if-loops/selective-synaptic-dampening`, `ssd.py`:
`ParameterPerturber.calc_importance` and `modify_weight`, called by `ssd_tuning` in
`forget_full_class_strategies.py`), whose normalisation is kept: an importance is the sum over
a loader's batches of the squared gradient of the batch-MEAN loss, divided by the number of
batches; the model is in eval mode (`model.eval()`, so BatchNorm uses its running averages);
loaders of 64 unshuffled items (the `-b` default of `forget_full_class_main.py`), D_r and D_f
in class order (their `build_retain_forget_sets` lists items class by class); every parameter
(BatchNorm scale and bias included, running statistics not) may be dampened.

As a population, one stage and one program: the D_f batches, then the D_r batches (sums of
squared gradients and batch counts), then one step that dampens (each plan row says which).
Their D loader is `ConcatDataset((D_r, D_f))` in batches of 64; here D's batches are D_r's
then D_f's, so

    I_f = S_f / n_f,   I_D = (S_r + S_f) / (n_r + n_f)

with S the sums of squared batch gradients and n the batch counts: the same normalisation;
only the one batch where their concatenation straddles D_r and D_f is formed differently.
D_f is taken once (CIFAR-100 class removal repeats it for CaMU's pairing, not SSD's data).

The official ResNet18 settings are alpha ("selection weighting") 10 and lambda ("dampening
constant") 1 (`forget_full_class_main.py`; the paper's CIFAR settings). They select nothing for a
class of a 10-class dataset: I_D holds D_f's own batches, I_D >= I_f * n_f / (n_r + n_f), so
I_f > alpha * I_D needs alpha < (n_r + n_f) / n_f ~ 10. The defaults here, alpha 0.1 and lambda
0.01, were searched for the MNIST CNN on a validation split of D_r (docs/methods.md, "SSD").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from camu_jax import engine, losses, sharding
from camu_jax.data.pipeline import item_keys, pad_to_batches, preprocess
from camu_jax.methods.base import Method, Stage, settings
from camu_jax.models import apply_model
from camu_jax.steps import cast_like

PyTree = Any


class SsdState(struct.PyTreeNode):
    """The model and the running importance sums: `sum_f`/`sum_r` (like the params) are the
    sums of squared batch gradients over D_f / D_r, `batches_f`/`batches_r` their counts."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    sum_f: PyTree
    sum_r: PyTree
    batches_f: jax.Array
    batches_r: jax.Array

    def importances(self) -> tuple[PyTree, PyTree]:
        """`(I_f, I_D)`: the official `calc_importance` of D_f and of D = D_r + D_f."""
        n_f = jnp.maximum(self.batches_f, 1.0)
        n_d = jnp.maximum(self.batches_f + self.batches_r, 1.0)

        def per(n, s):  # counts broadcast over a leaf, with or without a member axis
            return n.reshape(n.shape + (1,) * (s.ndim - n.ndim))

        i_f = jax.tree.map(lambda s: s / per(n_f, s), self.sum_f)
        i_d = jax.tree.map(lambda r, f: (r + f) / per(n_d, r), self.sum_r, self.sum_f)
        return i_f, i_d


def selection(i_f: PyTree, i_d: PyTree, *, alpha) -> PyTree:
    """The official synapse selection: `I_f > alpha * I_D`, per parameter (booleans); `alpha`
    a float or a scalar array (a member's data setting), cast to each leaf's dtype."""
    return jax.tree.map(lambda f, d: f > d * cast_like(alpha, d), i_f, i_d)


def dampen(params: PyTree, i_f: PyTree, i_d: PyTree, *, alpha, lam) -> PyTree:
    """The official `modify_weight`: where selected, `theta * min(lam * I_D / I_f, 1)`;
    elsewhere `theta` itself (a select, so unselected parameters stay bit-identical). `alpha`
    and `lam`: floats or scalar arrays (a member's data settings)."""

    def one(p, selected, f, d):
        # I_f > 0 wherever selected; the guard keeps the unused branch finite.
        weight = jnp.minimum((d * cast_like(lam, d)) / jnp.where(selected, f, 1.0), 1.0)
        return jnp.where(selected, p * weight, p)

    return jax.tree.map(one, params, selection(i_f, i_d, alpha=alpha), i_f, i_d)


@dataclasses.dataclass(frozen=True)
class SSD(Method):
    """Selective Synaptic Dampening (module docstring): `alpha` selection weighting, `lam`
    dampening constant, `batch_size` of the importance batches."""

    name = "ssd"
    title = "SSD"
    settings_as_data = True  # alpha and lam are per-member data (the dampening step's inputs)

    alpha: float = 0.1  # MNIST CNN, tuned (official ResNet18: 10)
    lam: float = 0.01  # MNIST CNN, tuned (official ResNet18: 1)
    batch_size: int = 64

    def stages(self):
        # One stage, one program: D_f's batches, then D_r's, then the dampening row (each
        # row's kind in the plan), where three programs would compile the same gradient twice.
        return (
            Stage("importance and dampening", functools.partial(_program, self), self._plan, 1),
        )

    def _plan(self, ctx, epoch):
        """`[steps, batch]` rows `k_rows` (training rows), `k_ids` (the item's position in
        its stream: its augmentation key), `k_mask`, `k_kind` (FORGET, REMAIN or DAMPEN, the
        same across a row): D_f's batches, D_r's, one dampening row."""
        f_ids, f_mask = _stream_batches(ctx, "f", self.batch_size)
        r_ids, r_mask = _stream_batches(ctx, "r", self.batch_size)
        f_rows, r_rows = ctx.forget[f_ids], ctx.remain[r_ids]
        one = np.zeros((1, self.batch_size), np.int32)
        kinds = [np.full(len(f_ids), FORGET), np.full(len(r_ids), REMAIN), [DAMPEN]]
        return {
            "k_rows": np.concatenate([f_rows, r_rows, one]).astype(np.int32),
            "k_ids": np.concatenate([f_ids, r_ids, one]).astype(np.int32),
            "k_mask": np.concatenate([f_mask, r_mask, np.ones((1, self.batch_size), np.float32)]),
            "k_kind": np.repeat(np.concatenate(kinds), self.batch_size)
            .reshape(-1, self.batch_size)
            .astype(np.int32),
        }


FORGET, REMAIN, DAMPEN = 0, 1, 2  # a plan row's kind ("frs".index of its stream, or dampen)


def _class_order(labels: np.ndarray) -> np.ndarray:
    return np.argsort(labels, kind="stable").astype(np.int32)


def _stream_batches(ctx, prefix: str, batch_size: int):
    """D_f (taken once, not repeated) or D_r in class order, in unshuffled batches: `(ids,
    mask)`, ids positions in the member's stream."""
    if prefix == "f":
        order = _class_order(ctx.labels[ctx.splits.forget])  # D_f once, not repeated
    else:
        order = _class_order(ctx.labels[ctx.remain])
    return pad_to_batches(order, batch_size)


def _init(variables):
    if isinstance(variables, SsdState):  # a later stage carries the sums on
        return variables
    zeros = jax.tree.map(jnp.zeros_like, variables["params"])
    return SsdState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        sum_f=zeros,
        sum_r=zeros,
        batches_f=jnp.zeros((), jnp.float32),
        batches_r=jnp.zeros((), jnp.float32),
    )


def _make_batch(spec, mesh):
    """A row's batch: `x`, `y`, `mask` of its training rows (a D_f or D_r item augmented
    afresh each step with the key `stream_batch` gives that stream's item: the step's key
    folded with `3 x step + kind`, then the item's position), its `kind`, the settings."""

    def make_batch(state, shared, member, row):
        images, labels = shared
        keys = None
        if spec.augment:
            kind = row["k_kind"][0]
            key = jax.random.fold_in(
                jax.random.wrap_key_data(member["step_key"]), state.step * 3 + kind
            )
            keys = item_keys(key, row["k_ids"])
        part = {
            "x": preprocess(images[row["k_rows"]], spec, augment_keys=keys),
            "y": labels[row["k_rows"]],
            "mask": row["k_mask"],
        }
        return {
            "rows": sharding.constrain_batch(part, mesh),
            "kind": row["k_kind"][0],
            "settings": member["settings"],
        }

    return make_batch


def _program(config: SSD, model, spec, mesh) -> engine.Program:
    """Each D_f or D_r row adds its batch's squared gradient to its sum; the dampening row
    dampens with the sums (its gradient, of no batch, is computed and dropped: a select, as a
    population's members may be at different rows). The selects keep every sum and weight
    bit-identical to a program per kind."""

    def step(state, batch):
        part, kind = batch["rows"], batch["kind"]

        def loss_fn(params):
            logits, _, _ = apply_model(
                model, params, state.batch_stats, part["x"], train=False, mask=part["mask"]
            )
            return losses.cross_entropy_mean(logits=logits, labels=part["y"], weights=part["mask"])

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        squares = jax.tree.map(jnp.square, grads)
        is_f, is_r, is_d = kind == FORGET, kind == REMAIN, kind == DAMPEN

        def add_if(flag, total, new):
            return jax.tree.map(lambda t, n: jnp.where(flag, t + n, t), total, new)

        s = settings(batch)  # alpha and lam: the member's data settings, not `config`'s
        i_f, i_d = state.importances()
        dampened = dampen(state.params, i_f, i_d, alpha=s["alpha"], lam=s["lam"])
        chosen = selection(i_f, i_d, alpha=s["alpha"])
        selected = sum(jnp.sum(x) for x in jax.tree.leaves(chosen)).astype(jnp.float32)
        state = state.replace(
            step=state.step + 1,
            params=jax.tree.map(lambda d, p: jnp.where(is_d, d, p), dampened, state.params),
            sum_f=add_if(is_f, state.sum_f, squares),
            sum_r=add_if(is_r, state.sum_r, squares),
            batches_f=jnp.where(is_f, state.batches_f + 1, state.batches_f),
            batches_r=jnp.where(is_r, state.batches_r + 1, state.batches_r),
        )
        zero = jnp.zeros_like(loss)
        metrics = {
            "loss": jnp.where(is_d, zero, loss),
            "selected": jnp.where(is_d, selected, jnp.zeros_like(selected)),
            "finite": jnp.where(is_d, jnp.array(True), jnp.isfinite(loss)),
        }
        return state, metrics

    return engine.Program(init=_init, step=step, make_batch=_make_batch(spec, mesh))


@dataclasses.dataclass(frozen=True)
class SSDWithImportances(SSD):
    """SSD whose results also hold the importances `i_f` and `i_d` (like the params) that
    chose and scaled the dampened parameters: for analysis, tuning and tests (not registered:
    a checkpoint holds only the model)."""

    def variables(self, state):
        i_f, i_d = state.importances()
        return {**super().variables(state), "i_f": i_f, "i_d": i_d}
