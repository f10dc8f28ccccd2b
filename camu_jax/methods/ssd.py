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

As a population, three stages: the D_f batches, then the D_r batches (sums of squared
gradients and batch counts), then one step that dampens. Their D loader is
`ConcatDataset((D_r, D_f))` in batches of 64; here D's batches are D_r's then D_f's, so

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

from camu_jax import engine, losses
from camu_jax.data.pipeline import pad_to_batches
from camu_jax.methods.base import Method, Stage, settings, stream_batch
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
        return (
            Stage(
                "forget importance",
                functools.partial(_importance, self, "forget"),
                functools.partial(_plan, prefix="f", batch_size=self.batch_size),
                1,
            ),
            Stage(
                "remain importance",
                functools.partial(_importance, self, "remain"),
                functools.partial(_plan, prefix="r", batch_size=self.batch_size),
                1,
            ),
            Stage("dampen", functools.partial(_dampen_program, self), self._plan_dampen, 1),
        )

    def _plan_dampen(self, ctx, epoch):
        # One row, no stream: its mask only marks the step active.
        return {"mask": np.ones((1, self.batch_size), np.float32)}


def _class_order(labels: np.ndarray) -> np.ndarray:
    return np.argsort(labels, kind="stable").astype(np.int32)


def _plan(ctx, epoch, *, prefix: str, batch_size: int):
    if prefix == "f":
        order = _class_order(ctx.labels[ctx.splits.forget])  # D_f once, not repeated
    else:
        order = _class_order(ctx.labels[ctx.remain])
    ids, mask = pad_to_batches(order, batch_size)
    return {f"{prefix}_ids": ids, f"{prefix}_mask": mask}


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


def _importance(config: SSD, stream: str, model, spec, mesh) -> engine.Program:
    def step(state, batch):
        part = batch[stream]

        def loss_fn(params):
            logits, _, _ = apply_model(
                model, params, state.batch_stats, part["x"], train=False, mask=part["mask"]
            )
            return losses.cross_entropy_mean(logits=logits, labels=part["y"], weights=part["mask"])

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        squares = jax.tree.map(jnp.square, grads)
        if stream == "forget":
            state = state.replace(
                sum_f=jax.tree.map(jnp.add, state.sum_f, squares), batches_f=state.batches_f + 1
            )
        else:
            state = state.replace(
                sum_r=jax.tree.map(jnp.add, state.sum_r, squares), batches_r=state.batches_r + 1
            )
        return state.replace(step=state.step + 1), {"loss": loss, "finite": jnp.isfinite(loss)}

    return engine.Program(init=_init, step=step, make_batch=stream_batch(config, spec, mesh))


def _dampen_program(config: SSD, model, spec, mesh) -> engine.Program:
    def step(state, batch):
        s = settings(batch)  # alpha and lam: the member's data settings, not `config`'s
        i_f, i_d = state.importances()
        params = dampen(state.params, i_f, i_d, alpha=s["alpha"], lam=s["lam"])
        chosen = selection(i_f, i_d, alpha=s["alpha"])
        selected = sum(jnp.sum(x) for x in jax.tree.leaves(chosen))
        metrics = {"selected": selected.astype(jnp.float32), "finite": jnp.array(True)}
        return state.replace(step=state.step + 1, params=params), metrics

    return engine.Program(init=_init, step=step, make_batch=stream_batch(config, spec, mesh))


@dataclasses.dataclass(frozen=True)
class SSDWithImportances(SSD):
    """SSD whose results also hold the importances `i_f` and `i_d` (like the params) that
    chose and scaled the dampened parameters: for analysis, tuning and tests (not registered:
    a checkpoint holds only the model)."""

    def variables(self, state):
        i_f, i_d = state.importances()
        return {**super().variables(state), "i_f": i_f, "i_d": i_d}
