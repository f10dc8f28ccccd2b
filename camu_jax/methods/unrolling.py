"""Unrolling SGD's single-gradient unlearning (Thudi, Deza, Chandrasekaran and Papernot,
"Unrolling SGD: Understanding Factors Influencing Machine Unlearning", IEEE EuroS&P 2022,
arXiv 2109.13398).

The paper unrolls t steps of SGD from the initial weights w_0 and expands each gradient to
first order around w_0 (the paper's Taylor-series analysis of SGD, whose first-order term gives
its "single gradient unlearning"):

    w_t ~= w_0 - eta * sum_{i<t} dL/dw (w_0; batch_i) + (terms in the Hessian at w_0)

so a data point x* contributes, to first order, `-eta * dL/dw(w_0; x*) / b` each time a batch
of size b (mean loss) holds it. Single-gradient unlearning adds that contribution back:

    theta_u = theta_T + eta * E * sum_{x in D_f} grad l(theta_0; x) / b

with E the number of times D_f was seen (the original's epochs). The official code
(`cleverhans-lab/unrolling-sgd`, `Unlearning/correlation_verification.py`) does exactly this:
`old_params[name] += (ep+1) * args.lr * grads[i]`, `grads` the gradient of the batch-mean loss
of the unlearned batch at the model training started from, in train mode.

Our originals are trained with Adam (coupled L2), not plain SGD, so the formula's premise does
not hold: the update direction is still D_f's first-order contribution at theta_0, but its size
is not eta times the training learning rate. `learning_rate` (their `--lr`, default 0.1 for
ResNet18 on CIFAR-10) is therefore a setting to tune. For the MNIST CNN it was searched on a
validation split of D_r with originals of 5 epochs (docs/methods.md, "Unrolling SGD"): eta 3e-3
at E = 5. The defaults keep that update, eta * E = 0.015, for the reference recipe's 20-epoch
originals (eta 7.5e-4, E 20); that transfer to longer-trained originals is untested.

theta_0 is rebuilt here: the original of seed s was initialised with
`init_variables(model, jax.random.key(s), input_shape)` (`experiments/run.py`), so `prepare`
repeats that call for every member's seed. The gradient pass runs over D_f once (not repeated,
in item order) in batches of the training's batch size, with BatchNorm in train mode as in
training; theta_T's BatchNorm statistics are kept. Set `original_epochs` and `batch_size` to the
original's recipe (defaults: camu_jax's `TrainConfig`, 20 epochs of 32) and keep eta * E at the
tuned 0.015 unless re-tuned.
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
from camu_jax import keys as host_keys
from camu_jax.data.pipeline import pad_to_batches
from camu_jax.methods.base import Method, Stage, settings, stream_batch
from camu_jax.models import apply_model, init_variables
from camu_jax.steps import cast_like

PyTree = Any


class UnrollingState(struct.PyTreeNode):
    step: jax.Array
    params: PyTree
    batch_stats: PyTree


@dataclasses.dataclass(frozen=True)
class UnrollingSGD(Method):
    """Single-gradient unlearning (module docstring): `learning_rate` is eta, `original_epochs`
    E (how often training saw D_f), `batch_size` b (the training's batch size)."""

    name = "unrolling"
    title = "Unrolling SGD"
    settings_as_data = True  # learning_rate is per-member data (E and b are int, static)

    learning_rate: float = 7.5e-4  # MNIST CNN, tuned as 3e-3 at E = 5 (module docstring)
    original_epochs: int = 20
    batch_size: int = 32

    @property
    def scale(self) -> float:
        """eta * E / b: the multiplier of the summed D_f gradient at theta_0 (host side; the
        program computes it from the member's `learning_rate`, `update_scale`)."""
        return update_scale(self.learning_rate, self.original_epochs, self.batch_size)

    def member_arrays(self, ctx):
        return {"init_key": host_keys.key_data(ctx.seed)}

    def prepare(self, model, originals, data, host):
        # One call per member, the very call that initialised the original of that seed.
        initial = [init_variables(model, k, data.input_shape) for k in np.asarray(host["init_key"])]
        initial = jax.tree.map(
            lambda x, o: np.asarray(x).astype(o.dtype), engine.stack(initial), originals
        )
        return {"initial": sharding.shard_members(initial, data.mesh)}

    def plan(self, ctx, epoch):
        ids, mask = pad_to_batches(
            np.arange(ctx.splits.forget.size, dtype=np.int32), self.batch_size
        )
        return {"f_ids": ids, "f_mask": mask}

    def stages(self):
        return (Stage("unlearn", functools.partial(_program, self), self.plan, 1),)


def update_scale(learning_rate, original_epochs: int, batch_size: int):
    """eta * E / b, in this order (a float, or an array for a traced `learning_rate`)."""
    return learning_rate * original_epochs / batch_size


def _program(config: UnrollingSGD, model, spec, mesh) -> engine.Program:
    make = stream_batch(config, spec, mesh)

    def make_batch(state, shared, member, row):
        return {**make(state, shared, member, row), "initial": member["initial"]}

    def init(variables):
        return UnrollingState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
        )

    def step(state, batch):
        f, initial = batch["forget"], batch["initial"]

        def summed_loss(params):
            logits, _, _ = apply_model(
                model, params, initial["batch_stats"], f["x"], train=True, mask=f["mask"]
            )
            mean = losses.cross_entropy_mean(logits=logits, labels=f["y"], weights=f["mask"])
            return mean * jnp.sum(f["mask"]), mean

        # The sum over the batch's items of grad l(theta_0; x): applied as it comes, since
        # every gradient is taken at theta_0, not at the state's parameters.
        (_, mean), grads = jax.value_and_grad(summed_loss, has_aux=True)(initial["params"])
        # eta (the member's data setting) * E / b: in float64 what the host computes; in
        # float32 it may differ from the host's float64 product in the last bit.
        scale = update_scale(
            settings(batch)["learning_rate"], config.original_epochs, config.batch_size
        )
        params = jax.tree.map(lambda p, g: p + cast_like(scale, g) * g, state.params, grads)
        metrics = {"loss": mean, "finite": jnp.isfinite(mean)}
        return state.replace(step=state.step + 1, params=params), metrics

    return engine.Program(init=init, step=step, make_batch=make_batch)
