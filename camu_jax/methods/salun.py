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
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from camu_jax import engine
from camu_jax.methods.base import Stage, epoch_plan, stream_batch
from camu_jax.methods.finetune import ce, forward, loss_program
from camu_jax.methods.relabel import RandomLabels


class SaliencyState(struct.PyTreeNode):
    """The saliency stage's state: the original's variables and the running gradient sum.
    Indexable like a variables dict, which is what the next stage's init reads."""

    step: jax.Array
    params: dict
    batch_stats: dict
    grads: dict

    def __getitem__(self, key):
        return getattr(self, key)


def saliency_program(method, model, spec, mesh) -> engine.Program:
    def init(variables):
        return SaliencyState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            grads=jax.tree.map(jnp.zeros_like, variables["params"]),
        )

    def step(state, batch):
        f = batch["forget"]

        def forget_loss(params):
            # Eval mode (`model.eval()` in theirs): BatchNorm statistics are not touched.
            logits, _, _ = forward(model, params, state.batch_stats, f, train=False)
            return ce(logits, f["y"], f["mask"])

        loss, grads = jax.value_and_grad(forget_loss)(state.params)
        metrics = {"loss": loss, "finite": jnp.isfinite(loss)}
        return state.replace(
            step=state.step + 1, grads=jax.tree.map(jnp.add, state.grads, grads)
        ), metrics

    return engine.Program(init=init, step=step, make_batch=stream_batch(method, spec, mesh))


def saliency_mask(grads, ratio: float):
    """A boolean pytree like `grads`: True for the `floor(ratio * n)` entries of largest
    |grads| over all n entries together (ties: the earlier entry in leaf order), as SalUn's
    global rank `< int(n * ratio)`."""
    leaves, treedef = jax.tree.flatten(grads)
    flat = jnp.concatenate([jnp.abs(g).ravel() for g in leaves])
    k = int(flat.size * ratio)
    order = jnp.argsort(-flat, stable=True)
    chosen = jnp.zeros(flat.shape, bool).at[order[:k]].set(True)
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

    def init_extra(self, variables):
        return saliency_mask(variables["grads"], self.saliency_ratio)

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
