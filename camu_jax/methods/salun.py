"""SalUn (Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency
in Both Image Classification and Generation", ICLR 2024; `OPTML-Group/SalUn`).

Two stages, both populations on the engine:

1. `saliency`: one pass over D_f in eval mode summing the gradients of the forget loss
   (CE on D_f at the original weights; `generate_mask.py`'s `save_gradient_ratio`: the sum
   over its batches of each batch's mean gradient).
2. `unlearn`: RL (`camu_jax.methods.relabel.RandomLabels`) with the weight-saliency mask: the
   `saliency_ratio` share of all parameters with the largest |summed gradient| (their
   `with_0.5.pt`: top 50 %, ranked over every parameter of the model together) may move, the
   others stay at the original's values. The mask gates the optimizer's *updates*, so weight
   decay and momentum cannot move a masked weight either; SalUn's code multiplies the
   gradients before `optimizer.step()`, where the coupled weight decay (5e-4) still shrinks
   masked weights by lr * 5e-4 per step.

`saliency_ratio` is data like the other settings: `prepare` turns each member's ratio into the
count of weights its mask keeps (`int(n * ratio)` on the host, in double precision, as the
reference's rank threshold), the saliency stage carries that count in its state, and the
unlearning stage's `init` ranks the summed gradients and keeps that many.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from camu_jax import engine, sharding
from camu_jax.methods.base import Stage, epoch_plan, stream_batch
from camu_jax.methods.finetune import ce, forward, loss_program
from camu_jax.methods.relabel import RandomLabels


class SaliencyState(struct.PyTreeNode):
    """The saliency stage's state: the original's variables, the running gradient sum, and how
    many weights the mask will keep (`keep`, the member's, set by every step). Indexable like a
    variables dict, which is what the next stage's init reads."""

    step: jax.Array
    params: dict
    batch_stats: dict
    grads: dict
    keep: jax.Array

    def __getitem__(self, key):
        return getattr(self, key)


def saliency_program(method, model, spec, mesh) -> engine.Program:
    make = stream_batch(method, spec, mesh)

    def init(variables):
        return SaliencyState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            grads=jax.tree.map(jnp.zeros_like, variables["params"]),
            keep=jnp.zeros((), jnp.int32),
        )

    def make_batch(state, shared, member, row):
        batch = make(state, shared, member, row)
        batch["salun_keep"] = member["salun_keep"]
        return batch

    def step(state, batch):
        f = batch["forget"]

        def forget_loss(params):
            # Eval mode (`model.eval()` in theirs): BatchNorm statistics are not touched.
            logits, _, _ = forward(model, params, state.batch_stats, f, train=False)
            return ce(logits, f["y"], f["mask"])

        loss, grads = jax.value_and_grad(forget_loss)(state.params)
        metrics = {"loss": loss, "finite": jnp.isfinite(loss)}
        if "salun_keep" in batch:  # the member's (`SalUn.prepare`)
            keep = batch["salun_keep"]
        else:  # a batch built by hand: the config's own ratio
            keep = saliency_count(state.grads, method.saliency_ratio)
        return state.replace(
            step=state.step + 1,
            grads=jax.tree.map(jnp.add, state.grads, grads),
            keep=jnp.asarray(keep, jnp.int32),
        ), metrics

    return engine.Program(init=init, step=step, make_batch=make_batch)


def saliency_count(tree, ratio: float) -> int:
    """`int(n * ratio)`: how many of the n entries of `tree` a mask of share `ratio` keeps (the
    reference's rank threshold, in double precision)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)) * ratio)


def saliency_mask(grads, ratio: float):
    """A boolean pytree like `grads`: True for the `floor(ratio * n)` entries of largest
    |grads| over all n entries together (ties: the earlier entry in leaf order), as SalUn's
    global rank `< int(n * ratio)`."""
    return top_mask(grads, saliency_count(grads, ratio))


def top_mask(grads, keep):
    """A boolean pytree like `grads`: True for the `keep` entries (an int, or a traced int32
    scalar) of largest |grads| over all entries together (ties: the earlier entry in leaf
    order)."""
    leaves, treedef = jax.tree.flatten(grads)
    flat = jnp.concatenate([jnp.abs(g).ravel() for g in leaves])
    order = jnp.argsort(-flat, stable=True)
    # The rank of each entry; the first `keep` ranks are chosen (`order[:keep]`, for any keep).
    rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    chosen = rank < keep
    out, start = [], 0
    for g in leaves:
        out.append(chosen[start : start + g.size].reshape(g.shape))
        start += g.size
    return jax.tree.unflatten(treedef, out)


@dataclasses.dataclass(frozen=True)
class SalUn(RandomLabels):
    """SalUn: RL restricted to the weights most salient for D_f (module docstring). Their
    defaults: saliency threshold 0.5, SGD momentum 0.9, weight decay 5e-4, batch 256,
    10 epochs for ResNet-18 on CIFAR-10. For the MNIST CNN the lr and epochs are tuned on a
    validation split of D_r (docs/methods.md); the threshold is theirs, not tuned."""

    name = "salun"
    title = "SalUn"
    settings_as_data = True  # learning_rate, momentum, weight_decay, saliency_ratio

    epochs: int = 2  # MNIST CNN, tuned (docs/methods.md)
    learning_rate: float = 0.03  # MNIST CNN, tuned (docs/methods.md)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    saliency_ratio: float = 0.5  # share of weights that may move (their `with_0.5.pt`)

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.saliency_ratio <= 1.0:
            raise ValueError(
                f"salun saliency_ratio must lie in (0, 1], got {self.saliency_ratio!r}"
            )

    def member_arrays(self, ctx):
        # The ratio in double precision (the data settings reach `prepare` in JAX's float
        # type), so that the count of kept weights is the reference's `int(n * ratio)`.
        return {"salun_ratio": np.float64(self.saliency_ratio)}

    def prepare(self, model, originals, data, host):
        one = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), originals["params"]
        )
        ratios = np.asarray(host["salun_ratio"], np.float64)
        keep = np.asarray([saliency_count(one, r) for r in ratios], np.int32)
        return {"salun_keep": sharding.shard_members(keep, data.mesh)}

    def init_extra(self, variables):
        return top_mask(variables["grads"], variables["keep"])

    def update_mask(self, extra):
        return extra

    def stages(self):
        return (
            Stage(
                "saliency",
                functools.partial(saliency_program, self),
                lambda ctx, epoch: epoch_plan(ctx, epoch, "f", self.batch_size),
                1,
            ),
            Stage("unlearn", functools.partial(loss_program, self), self.plan, self.epochs),
        )
