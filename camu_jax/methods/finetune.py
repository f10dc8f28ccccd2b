"""Loss-based unlearning methods: a loss over the step's forget / remain batches, one optimizer.

`LossMethod` is the shared machinery (state, step, plan, an optional update mask); a method
is a frozen config that names its `loss` and the streams it reads. The methods here:

* FT, fine-tuning on D_r (Warnecke et al., NDSS 2023; the "FT" baseline of Jia et al., NeurIPS
  2023 and Fan et al., ICLR 2024).
* GA / NegGrad, gradient ascent on D_f (Golatkar et al., CVPR 2020; Thudi et al., EuroS&P 2022).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import struct

from camu_jax import engine, losses
from camu_jax.methods.base import Method, Stage, epoch_plan, stream_batch
from camu_jax.models import apply_model

PyTree = Any


class LossState(struct.PyTreeNode):
    """State of a one-optimizer method: parameters, BatchNorm statistics, optimizer state, and
    the method's own arrays (`extra`: e.g. a saliency mask), which the optimizer never moves."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    extra: PyTree = None


def sgd(learning_rate: float, momentum: float, weight_decay: float):
    """PyTorch `SGD(lr, momentum, weight_decay)`: coupled L2, then heavy-ball momentum."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.trace(decay=momentum) if momentum else optax.identity(),
        optax.scale(-learning_rate),
    )


class LossMethod(Method):
    """A method that minimises `loss(...)` with SGD (momentum, coupled weight decay) over
    epochs of the `driver` stream, with full batches of the `also` streams drawn alongside.

    Subclasses are frozen dataclasses with fields `epochs`, `learning_rate`, `momentum`,
    `weight_decay`, `batch_size`, and define `loss`."""

    driver: ClassVar[str] = "r"  # f (D_f), r (D_r) or s (D_s): one epoch = one pass over it
    also: ClassVar[tuple[str, ...]] = ()

    def tx(self):
        return sgd(self.learning_rate, self.momentum, self.weight_decay)

    def loss(self, model, params, batch_stats, batch, extra):
        """`(loss, (batch_stats, metrics))` of one step; `batch[stream]` as in `stream_batch`."""
        raise NotImplementedError

    def init_extra(self, variables) -> PyTree:
        """Arrays the state carries besides the model (default none)."""
        return None

    def update_mask(self, extra):
        """A 0/1 pytree like the params that gates every update (default: none)."""
        return None

    def epochs_steps(self, ctx) -> int | None:
        """Cap on the steps of an epoch (default: a full pass over the driver stream)."""
        return None

    def plan(self, ctx, epoch):
        return epoch_plan(
            ctx, epoch, self.driver, self.batch_size, also=self.also, steps=self.epochs_steps(ctx)
        )

    def stages(self):
        return (Stage("unlearn", functools.partial(loss_program, self), self.plan, self.epochs),)


def loss_program(method: LossMethod, model, spec, mesh) -> engine.Program:
    tx = method.tx()

    def init(variables):
        return LossState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(variables["params"]),
            extra=method.init_extra(variables),
        )

    def step(state, batch):
        def loss_fn(params):
            return method.loss(model, params, state.batch_stats, batch, state.extra)

        (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        mask = method.update_mask(state.extra)
        if mask is not None:  # after the optimizer: weight decay cannot move masked weights
            updates = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, mask)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **metrics}
        metrics["finite"] = jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()]))
        return state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        ), metrics

    return engine.Program(init=init, step=step, make_batch=stream_batch(method, spec, mesh))


def forward(model, params, batch_stats, part, *, train=True):
    """`(logits, embedding, batch_stats)` of one stream's batch (masked BatchNorm)."""
    return apply_model(model, params, batch_stats, part["x"], train=train, mask=part["mask"])


def ce(logits, labels, mask):
    return losses.cross_entropy_mean(logits=logits, labels=labels, weights=mask)


@dataclasses.dataclass(frozen=True)
class FineTune(LossMethod):
    """FT: continue training on D_r only, so that D_f is forgotten catastrophically (Warnecke et
    al., NDSS 2023; the FT baseline of Jia et al., NeurIPS 2023, `Unlearn-Sparse`
    `unlearn/FT.py`: SGD, momentum 0.9, weight decay 5e-4, 10 epochs, lr 0.01-0.1 for ResNet18
    on CIFAR-10). For the MNIST CNN the epochs and lr are tuned on a validation split of D_r
    (docs/methods.md)."""

    name = "ft"
    driver = "r"

    epochs: int = 2
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32

    def loss(self, model, params, batch_stats, batch, extra):
        r = batch["remain"]
        logits, _, batch_stats = forward(model, params, batch_stats, r)
        return ce(logits, r["y"], r["mask"]), (batch_stats, {})


@dataclasses.dataclass(frozen=True)
class GradientAscent(LossMethod):
    """GA / NegGrad: gradient ascent on D_f, i.e. minimise -CE(f(x_f), y_f) (Golatkar et al.,
    CVPR 2020; Thudi et al., EuroS&P 2022; `Unlearn-Sparse` `unlearn/GA.py`: SGD, momentum
    0.9, weight decay 5e-4, 5 epochs, lr 1e-5-1e-3 for ResNet18 on CIFAR-10). For the MNIST
    CNN the epochs and lr are tuned on a validation split of D_r (docs/methods.md)."""

    name = "ga"
    driver = "f"

    epochs: int = 1
    learning_rate: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32

    def loss(self, model, params, batch_stats, batch, extra):
        f = batch["forget"]
        logits, _, batch_stats = forward(model, params, batch_stats, f)
        return -ce(logits, f["y"], f["mask"]), (batch_stats, {})
