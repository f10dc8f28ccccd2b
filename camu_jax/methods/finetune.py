"""Loss-based unlearning methods: a loss over the step's forget / remain batches, one optimizer.

`LossMethod` is the shared machinery of every one-optimizer method (state, step, plan, hooks
for the batch, an update mask and an update scale; `loss_program` builds its program); a
method is a frozen config that names its `loss` and the streams it reads. Their float settings
are data (`Method.settings_as_data`): a step reads them with `setting(method, batch, name)`,
and its optimizer is built inside the step from them (`LossMethod.tx(batch)`), so one program
serves every value and the members of one population may differ in them. The methods here:

* FT, fine-tuning on D_r (Warnecke et al., NDSS 2023; the "FT" baseline of Jia et al., NeurIPS
  2023 and Fan et al., ICLR 2024).
* GA / NegGrad, gradient ascent on D_f (Golatkar et al., CVPR 2020; Thudi et al., EuroS&P 2022).
* NegGrad+, descent on D_r and ascent on D_f together (Kurmanji et al., NeurIPS 2023).
* l1-sparse, FT with a decaying L1 penalty (Jia et al., NeurIPS 2023).

The other `LossMethod`s: the relabelling methods (RL, Amnesiac, SalUn) in
`camu_jax.methods.relabel` and `camu_jax.methods.salun`, boundary shrink in
`camu_jax.methods.boundary`, Bad Teacher and SCRUB in `camu_jax.methods.teachers`, UNSIR's
impair and repair stages in `camu_jax.methods.unsir`. The MNIST CNN settings and how they were
chosen: docs/methods.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from camu_jax import engine, losses
from camu_jax.methods.base import Method, Stage, epoch_plan, settings, stream_batch
from camu_jax.models import apply_model, state_variables
from camu_jax.steps import cast_like, sgd_traced, with_finite

PyTree = Any


class LossState(struct.PyTreeNode):
    """State of a one-optimizer method: parameters, BatchNorm statistics, optimizer state, and
    the method's own arrays (`extra`: e.g. a saliency mask), which the optimizer never moves."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    extra: PyTree = None


def setting(method: Method, batch: dict, name: str):
    """The data setting `name` of the member whose step gets `batch` (or whose `prepare` gets
    `host`): `settings(batch)[name]`, a per-member (traced) scalar, in every batch the
    programs of `run_population` build; in a batch built by hand without settings, the
    config's own value (a concrete config: a skeleton's is None, and that fails here)."""
    values = settings(batch) if "settings" in batch else None
    if values is not None and name in values:
        return values[name]
    value = getattr(method, name)
    if value is None:
        raise TypeError(
            f"{method.name}.{name} is a data setting: this batch carries no `settings` and the "
            "config is a skeleton (Method.skeleton), which holds no value"
        )
    return value


def stand_in_settings(method: Method) -> dict:
    """`{"settings": ...}` with any value (0.0) for each of `method`'s data settings: what
    building its optimizer for `init` needs, where no member's values are at hand (an
    optimizer state's structure and initial zeros do not depend on them)."""
    return {
        "settings": {
            f.name: 0.0
            for f in dataclasses.fields(method)
            if f.type in ("float", float) and f.name not in method.static_settings
        }
    }


class LossMethod(Method):
    """A method that minimises `loss(...)` with one optimizer (by default SGD: momentum,
    coupled weight decay) over epochs of the `driver` stream, with full batches of the `also`
    streams drawn alongside, in one stage named `stage`.

    Subclasses are frozen dataclasses that define `loss`; the defaults of `tx`, `plan` and
    `stages` read fields `epochs`, `learning_rate`, `momentum`, `weight_decay`, `batch_size`
    (a method with other fields overrides them). The hooks below shape the step that
    `loss_program` builds. A subclass with `settings_as_data = True` reads its float settings
    in `tx`, `loss` and `make_batch` through `setting(self, batch, name)`, never as fields
    (its programs are built from its skeleton, whose data settings are None)."""

    driver: ClassVar[str] = "r"  # f (D_f), r (D_r) or s (D_s): one epoch = one pass over it
    also: ClassVar[tuple[str, ...]] = ()
    stage: ClassVar[str] = "unlearn"  # the stage's name (loss records, progress, errors)

    def tx(self, batch: dict | None = None):
        """The optimizer of the member whose step gets `batch`, from its data settings (None:
        the config's own values); its state's structure does not depend on them."""
        v = functools.partial(setting, self, batch or {})
        return sgd_traced(v("learning_rate"), v("momentum"), v("weight_decay"))

    def loss(self, model, params, batch_stats, batch, extra):
        """`(loss, (batch_stats, metrics))` of one step: `batch` is what `make_batch` built
        (by default `batch[stream]` as in `stream_batch`), `extra` the state's own arrays."""
        raise NotImplementedError

    def init_extra(self, variables) -> PyTree:
        """Arrays the state carries besides the model (default none)."""
        return None

    def update_mask(self, extra):
        """A 0/1 pytree like the params that gates every update (default: none)."""
        return None

    def update_scale(self, batch):
        """A scalar multiplying every update after the optimizer (default: none): for SGD,
        which applies the learning rate last, a per-step learning-rate factor."""
        return None

    def epochs_steps(self, ctx) -> int | None:
        """Cap on the steps of an epoch (default: a full pass over the driver stream)."""
        return None

    def plan(self, ctx, epoch):
        return epoch_plan(
            ctx, epoch, self.driver, self.batch_size, also=self.also, steps=self.epochs_steps(ctx)
        )

    def make_batch(self, model, spec, mesh):
        """The engine's `make_batch` (default: the forget / remain / sample streams); it runs
        inside the step's program, so it may read the member's prepared data (teachers...)
        and apply `model` to it."""
        return stream_batch(self, spec, mesh)

    def stages(self):
        return (Stage(self.stage, functools.partial(loss_program, self), self.plan, self.epochs),)


def loss_program(method: LossMethod, model, spec, mesh, *, tx=None) -> engine.Program:
    """The program of a one-optimizer stage: the optimizer `tx(batch)` (default `method.tx`:
    built inside each step from the member's data settings in `batch`) minimises
    `method.loss` on the batches `method.make_batch` builds; updates are scaled by
    `method.update_scale` and gated by `method.update_mask`. The state starts from the model's
    variables, or from the previous stage's state (its parameters and BatchNorm statistics,
    with a fresh optimizer)."""
    make_tx = method.tx if tx is None else tx
    stand_in = stand_in_settings(method)

    def init(variables):
        v = state_variables(variables)
        return LossState(
            step=jnp.zeros((), jnp.int32),
            params=v["params"],
            batch_stats=v["batch_stats"],
            opt_state=make_tx(stand_in).init(v["params"]),
            extra=method.init_extra(variables),
        )

    def step(state, batch):
        def loss_fn(params):
            return method.loss(model, params, state.batch_stats, batch, state.extra)

        (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = make_tx(batch).update(grads, state.opt_state, state.params)
        scale = method.update_scale(batch)
        if scale is not None:
            updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
        mask = method.update_mask(state.extra)
        if mask is not None:  # after the optimizer: weight decay cannot move masked weights
            # `where`, not a product: 0 * inf would still move a weight.
            updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, mask)
        params = optax.apply_updates(state.params, updates)
        return state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        ), with_finite({"loss": loss, **metrics})

    return engine.Program(init=init, step=step, make_batch=method.make_batch(model, spec, mesh))


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
    title = "FT"
    driver = "r"
    settings_as_data = True  # learning_rate, momentum, weight_decay

    epochs: int = 10  # MNIST CNN, tuned (docs/methods.md)
    learning_rate: float = 0.1  # MNIST CNN, tuned (docs/methods.md)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256

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
    title = "GA"
    driver = "f"
    settings_as_data = True  # learning_rate, momentum, weight_decay

    epochs: int = 1  # MNIST CNN, tuned (docs/methods.md)
    learning_rate: float = 0.01  # MNIST CNN, tuned (docs/methods.md)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256

    def loss(self, model, params, batch_stats, batch, extra):
        f = batch["forget"]
        logits, _, batch_stats = forward(model, params, batch_stats, f)
        return -ce(logits, f["y"], f["mask"]), (batch_stats, {})


def l2_distance(params, anchor):
    """`sum (theta - theta_0)^2` over every parameter."""
    return sum(
        jnp.sum((p - a) ** 2)
        for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(anchor), strict=True)
    )


@dataclasses.dataclass(frozen=True)
class NegGradPlus(LossMethod):
    """NegGrad+: minimise `alpha * (CE(D_r batch) + anchor_decay/2 * ||theta - theta_0||^2)
    - (1 - alpha) * CE(D_f batch)` (Kurmanji et al., "Towards Unbounded Machine Unlearning",
    NeurIPS 2023). As the official code (`meghdadk/SCRUB`, `small_scale_unlearning.ipynb`,
    `run_neggrad_epoch` / `negative_grad`): an epoch is one pass over D_r, each D_r batch paired
    with a D_f batch (their `zip(retain, cycle(forget))`; here the D_f passes are reshuffled
    where `itertools.cycle` replays its first pass), plain SGD (no momentum, no weight decay),
    and an L2 pull towards the original weights theta_0 inside the alpha term (their
    `l2_penalty(model, model_init, weight_decay)`, weight decay 0.1 in that notebook).
    Official settings there: alpha 0.95, lr 0.01, 10 epochs, batch 128. For the MNIST CNN the
    lr and epochs are tuned on a validation split of D_r (docs/methods.md)."""

    name = "neggrad_plus"
    title = "NegGrad+"
    driver = "r"
    also = ("f",)
    settings_as_data = True  # learning_rate, momentum, weight_decay, alpha, anchor_decay

    epochs: int = 3  # MNIST CNN, tuned (docs/methods.md)
    learning_rate: float = 0.05  # MNIST CNN, tuned (docs/methods.md)
    momentum: float = 0.0
    weight_decay: float = 0.0
    alpha: float = 0.95
    anchor_decay: float = 0.1
    batch_size: int = 128

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"neggrad_plus alpha must lie in [0, 1], got {self.alpha!r}")

    def _nonneg(self):
        return (*super()._nonneg(), "anchor_decay", "alpha")

    def init_extra(self, variables):
        # theta_0 for the L2 pull, kept whatever anchor_decay is (data: 0 adds 0 x the
        # distance); a copy, so that donating the state never frees the original.
        return jax.tree.map(jnp.array, variables["params"])

    def loss(self, model, params, batch_stats, batch, extra):
        r, f = batch["remain"], batch["forget"]
        # The reference's order (D_r, then D_f), which fixes how BatchNorm statistics evolve.
        logits_r, _, batch_stats = forward(model, params, batch_stats, r)
        logits_f, _, batch_stats = forward(model, params, batch_stats, f)
        ce_r = ce(logits_r, r["y"], r["mask"])
        ce_f = ce(logits_f, f["y"], f["mask"])
        alpha = cast_like(setting(self, batch, "alpha"), ce_r)
        retain = ce_r
        if extra is not None:
            anchor_decay = cast_like(setting(self, batch, "anchor_decay"), ce_r)
            retain = retain + 0.5 * anchor_decay * l2_distance(params, extra)
        loss = alpha * retain - (1.0 - alpha) * ce_f
        return loss, (batch_stats, {"ce_remain": ce_r, "ce_forget": ce_f})


def l1_coefficient(gamma: float, epoch: int, epochs: int, no_l1_epochs: int) -> float:
    """The L1 weight of epoch `epoch` (0-based) in `Unlearn-Sparse` `FT_iter`: `gamma` decayed
    linearly to 0 over the first `epochs - no_l1_epochs` epochs, 0 after them (`gamma`
    throughout when every epoch is an `no_l1` epoch, as theirs)."""
    active = epochs - no_l1_epochs
    if epoch < active:
        return gamma * (1.0 - epoch / active)
    return gamma if active == 0 else 0.0


@dataclasses.dataclass(frozen=True)
class L1Sparse(LossMethod):
    """l1-sparse: FT on D_r with an L1 penalty, minimise `CE(D_r batch) + gamma_t *
    ||theta||_1` with gamma_t decaying linearly over the epochs (Jia et al., "Model Sparsity
    Can Simplify Machine Unlearning", NeurIPS 2023; `OPTML-Group/Unlearn-Sparse`
    `FT_l1` / `FT_iter` (`--unlearn FT_prune`): gamma_t = gamma * (1 - epoch / (epochs -
    no_l1_epochs)), constant within an epoch, the norm over every parameter; SGD momentum 0.9,
    weight decay 5e-4, batch 256, 10 epochs, lr 0.01 and gamma 5e-4 for ResNet-18 on
    CIFAR-10). For the MNIST CNN the lr, epochs and gamma are tuned on a validation split of
    D_r (docs/methods.md)."""

    name = "l1_sparse"
    title = "l1-sparse"
    driver = "r"
    # learning_rate, momentum, weight_decay; gamma through the plan (`l1_gamma`: drawn per
    # member from its own config, like any plan).
    settings_as_data = True

    epochs: int = 3  # MNIST CNN, tuned (docs/methods.md)
    learning_rate: float = 0.1  # MNIST CNN, tuned (docs/methods.md)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    gamma: float = 0.0005  # MNIST CNN, tuned (docs/methods.md)
    no_l1_epochs: int = 0
    batch_size: int = 256

    def validate(self) -> None:
        super().validate()
        if self.no_l1_epochs > self.epochs:
            raise ValueError(
                f"l1_sparse no_l1_epochs ({self.no_l1_epochs}) exceeds epochs ({self.epochs})"
            )

    def _nonneg(self):
        return (*super()._nonneg(), "no_l1_epochs", "gamma")

    def plan(self, ctx, epoch):
        plan = super().plan(ctx, epoch)
        coef = l1_coefficient(self.gamma, epoch, self.epochs, self.no_l1_epochs)
        # A per-step entry of the plan (not a field of the program), so that one compiled
        # program serves every epoch and every gamma.
        plan["l1_gamma"] = np.full(plan["r_ids"].shape, coef, np.float32)
        return plan

    def loss(self, model, params, batch_stats, batch, extra):
        r = batch["remain"]
        logits, _, batch_stats = forward(model, params, batch_stats, r)
        ce_r = ce(logits, r["y"], r["mask"])
        l1 = sum(jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params))
        gamma = batch["l1_gamma"][0].astype(ce_r.dtype)
        return ce_r + gamma * l1, (batch_stats, {"ce_remain": ce_r, "l1": l1})
