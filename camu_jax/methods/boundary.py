"""Boundary Unlearning (Chen et al., "Boundary Unlearning: Rapid Forgetting of Deep Networks via
Shifting the Decision Space", CVPR 2023; official code `TY-LEE-KR/Boundary-Unlearning-Code`,
`boundary_unlearning.py`): boundary shrink and boundary expand.

Both fine-tune the model on D_f alone with plain SGD (lr 1e-5, momentum 0.9, no weight decay,
batch 64, 10 epochs: the official `boundary_shrink` / `boundary_expanding` settings).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from camu_jax import engine, sharding
from camu_jax import keys as host_keys
from camu_jax.data.pipeline import item_keys, preprocess
from camu_jax.methods.base import Method, Stage, epoch_plan, settings, stream_batch
from camu_jax.methods.finetune import LossMethod, ce, forward, setting
from camu_jax.models import apply_model, head_modules, state_variables
from camu_jax.prediction import map_rows, zero_keys
from camu_jax.steps import cast_like, sgd_traced

# Images per FGSM call over all members: bounds the activation memory of the input gradient.
IMAGES_PER_CALL = 8192


def fgsm_labels(model, variables, x, y, *, mean, std, bound):
    """The class the frozen model assigns to a one-step FGSM perturbation of each input (the
    official `FGSM.perturb`, then `argmax(test_model(x_adv))`): `[batch]` int32.

    `x` are model inputs (normalised with `mean`/`std`); the step moves every pixel by `bound`
    in pixel space ([0, 1]) along the sign of the input gradient of the cross-entropy with the
    true labels `y`, clips to [0, 1] and rounds to the 8-bit grid (the official `clamper` with
    `discrete=True`). Eval mode throughout, as the official `test_model.eval()`. Where the
    attack fails the true label comes back, and the item is trained on its own label, as in
    the official code. `bound`: a number or a (traced) scalar.
    """
    params, batch_stats = variables["params"], variables["batch_stats"]

    def loss(inputs):
        logits, _, _ = apply_model(model, params, batch_stats, inputs, train=False)
        log_p = jax.nn.log_softmax(logits, axis=-1)
        # A sum, not the official mean: the sign of each item's gradient is the same, and it
        # does not depend on which items share the batch.
        return -jnp.sum(jnp.take_along_axis(log_p, y[:, None], axis=-1))

    grad = jax.grad(loss)(x)
    pixels = x * std + mean
    step = jnp.sign(grad)
    adv = jnp.clip(pixels + cast_like(bound, step) * step, 0.0, 1.0)
    adv = jnp.round(adv * 255.0) / 255.0
    logits, _, _ = apply_model(model, params, batch_stats, (adv - mean) / std, train=False)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _shadow_weights(d: int, std: float):
    """`[P, d]` initial shadow-unit weights, N(0, std^2), from `[P]` key data: one program."""
    return jax.jit(jax.vmap(lambda k: std * jax.random.normal(jax.random.wrap_key_data(k), (d,))))


@functools.lru_cache(maxsize=16)
def _fgsm_program(model, spec, mesh, augment: bool):
    dtype = jax.dtypes.canonicalize_dtype(np.float64)
    mean = np.asarray(spec.mean, dtype)  # constants of the program (numpy: nothing compiled)
    std = np.asarray(spec.std, dtype)

    def one(variables, images, labels, rows, ids, aug_key, bound):
        keys = item_keys(jax.random.wrap_key_data(aug_key), ids) if augment else None
        x = preprocess(images[rows], spec, augment_keys=keys)
        return fgsm_labels(model, variables, x, labels[rows], mean=mean, std=std, bound=bound)

    vmapped = sharding.vmap_members(one, mesh, (0, None, None, 0, 0, 0, 0))
    return jax.jit(vmapped)


def adversarial_labels(model, originals, data, rows, *, bound, aug_keys=None):
    """`[P, n]` device array: `fgsm_labels` of every member's frozen original on its `rows`
    (`[P, n]` host rows of `data`); `aug_keys` (`[P]` key data): item i gets the fixed
    augmentation `fold_in(aug_key, i)`, as a `fixed_augment` stream sees it. `bound`: a number,
    or one per member (`[P]`: data, one compiled program serves every value)."""
    mesh = data.mesh
    rows = np.asarray(rows, np.int32)
    members, n = rows.shape
    augment = aug_keys is not None
    keys = aug_keys if augment else zero_keys(members)
    keys = sharding.shard_members(np.asarray(keys), mesh)
    bounds = np.broadcast_to(
        np.asarray(bound, jax.dtypes.canonicalize_dtype(np.float64)), (members,)
    )
    bounds = sharding.shard_members(bounds, mesh)
    run = _fgsm_program(model, data.spec, mesh, augment)
    outs = map_rows(
        lambda r, ids: run(originals, data.images, data.labels, r, ids, keys, bounds),
        rows,
        mesh,
        batch=256,
        images_per_call=IMAGES_PER_CALL,
    )
    # Joined on the host and placed again (a device concatenation is one more program).
    return sharding.shard_members(np.concatenate(sharding.fetch(outs), axis=1)[:, :n], mesh)


@dataclasses.dataclass(frozen=True)
class BoundaryShrink(LossMethod):
    """Boundary shrink: every forget item is relabelled with its *nearest wrong class*, the
    class the frozen original predicts for a one-step FGSM perturbation of it (bound 0.1 in
    pixel space), and the model is fine-tuned on D_f with those labels (cross-entropy), which
    pulls the forget items across the nearest decision boundary (Chen et al., CVPR 2023).

    Official settings (`boundary_shrink`, `main.py`): FGSM bound 0.1, SGD lr 1e-5, momentum
    0.9, no weight decay, batch 64, 10 epochs over D_f. The official code recomputes the FGSM
    labels every step from the frozen original; they are a fixed function of each item (no
    random start), so they are computed once here (`prepare`, one vmapped pass of every
    member's original over its D_f); D_f items keep one augmentation per item so the labels
    stay those of the inputs trained on. For the MNIST CNN the lr and epochs are tuned
    (docs/methods.md, "boundary_shrink").
    """

    name = "boundary_shrink"
    title = "Boundary shrink"
    driver = "f"
    fixed_augment = ("forget",)
    settings_as_data = True  # learning_rate, momentum, weight_decay, bound

    epochs: int = 10  # MNIST CNN, tuned (docs/methods.md)
    learning_rate: float = 0.001  # MNIST CNN, tuned (docs/methods.md)
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    bound: float = 0.1  # FGSM step in pixel space ([0, 1])

    def prepare(self, model, originals, data, host):
        aug = host["aug_key"] if data.spec.augment else None
        bound = setting(self, host, "bound")  # each member's (`[P]`)
        labels = adversarial_labels(
            model, originals, data, host["forget_rows"], bound=bound, aug_keys=aug
        )
        return {"f_adv_y": labels}

    def loss(self, model, params, batch_stats, batch, extra):
        f = batch["forget"]
        logits, _, batch_stats = forward(model, params, batch_stats, f)
        flipped = jnp.sum((f["adv_y"] != f["y"]) * f["mask"]) / jnp.maximum(jnp.sum(f["mask"]), 1)
        return ce(logits, f["adv_y"], f["mask"]), (batch_stats, {"flipped": flipped})


# ------------------------------------------------------------------------------ expand

_SHADOW_TAG = 0x5AD0


class ExpandState(struct.PyTreeNode):
    """The model and the shadow unit, trained together by one SGD. `shadow` holds the unit's
    offsets from its initial weights (drawn per member in `prepare`, member data)."""

    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    shadow: dict  # {"w": [d], "b": []}


def embedding_width(model, variables) -> int:
    """Width of the model's (flattened) embedding, read from the first head module (the one
    the embedding feeds): its `kernel` is `[d, out]`. A stage's `init` sees only the
    variables, so this is where the shadow unit's shape can come from."""
    heads = head_modules(model)
    params = variables["params"]
    kernel = params.get(heads[0], {}).get("kernel") if heads else None
    if kernel is None or kernel.ndim != 2:
        raise TypeError(
            f"boundary_expand attaches its shadow unit to the embedding and reads the "
            f"embedding width from the first of {type(model).__name__}.head_modules "
            f"({heads!r}), which must be a dense layer with a `[width, out]` kernel"
        )
    return int(kernel.shape[0])


@dataclasses.dataclass(frozen=True)
class BoundaryExpand(Method):
    """Boundary expand: the classifier gets one extra *shadow* class; the model is fine-tuned
    on D_f with every item labelled as the shadow class, and the shadow unit is then dropped,
    so the forget items' features now sit in a region no remaining class claims (Chen et al.,
    CVPR 2023).

    How camu-jax realises the "extra neuron" for any model: a linear unit on the model's
    embedding (`w . z + b`, z the flattened embedding) whose logit is appended to the model's
    logits during this stage; model and unit train together; `variables` returns the model
    alone. Its initial weights are drawn per member as the official widened layer's
    (`xavier_normal_`: std sqrt(2 / (d + classes + 1)), bias 0). For ResNet18 the embedding
    is the input of the final linear layer, so this is exactly the official widening; for
    the CNN the embedding is fc1's output (256 wide), not the last hidden layer (fc2's, 128
    wide): the CNN has no nonlinearity after fc1, so its logits are affine in the embedding and
    a unit there can express every unit on fc2's output, and more.

    Official settings (`boundary_expanding`): SGD lr 1e-5, momentum 0.9, no weight decay,
    batch 64, 10 epochs over D_f. For the MNIST CNN the lr and epochs are tuned
    (docs/methods.md, "boundary_expand").
    """

    name = "boundary_expand"
    title = "Boundary expand"
    # learning_rate and momentum are per-member data: the SGD is built inside the step from
    # the member's settings (`steps.sgd_traced`, whose state does not depend on them).
    settings_as_data = True

    epochs: int = 1  # MNIST CNN, tuned (docs/methods.md)
    learning_rate: float = 0.0001  # MNIST CNN, tuned (docs/methods.md)
    momentum: float = 0.9
    batch_size: int = 64

    def _nonneg(self):
        return ("momentum",)

    def member_arrays(self, ctx):
        return {"shadow_key": host_keys.fold_in(host_keys.key_data(ctx.seed), _SHADOW_TAG)}

    def prepare(self, model, originals, data, host):
        one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), originals)
        x = jax.ShapeDtypeStruct((1, *data.input_shape), jnp.result_type(float))
        logits, emb, _ = jax.eval_shape(
            lambda v, x: apply_model(model, v["params"], v["batch_stats"], x, train=False),
            one,
            x,
        )
        d = math.prod(emb.shape[1:])
        if d != embedding_width(model, one):
            raise TypeError(
                f"{type(model).__name__}'s embedding has {d} features but its first head "
                f"module reads {embedding_width(model, one)}: boundary_expand needs the "
                "first of head_modules to be the layer the embedding feeds"
            )
        std = math.sqrt(2.0 / (d + logits.shape[-1] + 1))
        w = _shadow_weights(d, std)(np.asarray(host["shadow_key"]))
        shadow = {"w": np.asarray(w), "b": np.zeros(w.shape[0], w.dtype)}
        return {"shadow0": sharding.shard_members(shadow, data.mesh)}

    def plan(self, ctx, epoch):
        return epoch_plan(ctx, epoch, "f", self.batch_size)

    def stages(self):
        return (Stage("expand", functools.partial(_expand_program, self), self.plan, self.epochs),)


def _expand_tx(s) -> optax.GradientTransformation:
    """Boundary expand's SGD (no weight decay) from a member's data settings `s`."""
    return sgd_traced(s["learning_rate"], s["momentum"], 0.0)


def _expand_program(config: BoundaryExpand, model, spec, mesh) -> engine.Program:
    # The optimizer's state does not depend on the values: any serve `init`.
    init_tx = _expand_tx({"learning_rate": 0.0, "momentum": 0.0})
    make = stream_batch(config, spec, mesh)

    def init(variables):
        v = state_variables(variables)
        d = embedding_width(model, v)
        dtype = jax.tree.leaves(v["params"])[0].dtype
        shadow = {"w": jnp.zeros((d,), dtype), "b": jnp.zeros((), dtype)}
        trainable = {"model": v["params"], "shadow": shadow}
        return ExpandState(
            step=jnp.zeros((), jnp.int32),
            params=v["params"],
            batch_stats=v["batch_stats"],
            opt_state=init_tx.init(trainable),
            shadow=shadow,
        )

    def make_batch(state, shared, member, row):
        batch = make(state, shared, member, row)
        batch["shadow0"] = member["shadow0"]
        return batch

    def step(state, batch):
        f = batch["forget"]

        def loss_fn(trainable):
            logits, emb, bs = forward(model, trainable["model"], state.batch_stats, f)
            emb = emb.reshape(emb.shape[0], -1)
            w = batch["shadow0"]["w"] + trainable["shadow"]["w"]
            b = batch["shadow0"]["b"] + trainable["shadow"]["b"]
            wide = jnp.concatenate([logits, (emb @ w + b)[:, None]], axis=-1)
            shadow_class = jnp.full(f["y"].shape, logits.shape[-1], jnp.int32)
            return ce(wide, shadow_class, f["mask"]), bs

        trainable = {"model": state.params, "shadow": state.shadow}
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        tx = _expand_tx(settings(batch))
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss, "finite": jnp.isfinite(loss)}
        return state.replace(
            step=state.step + 1,
            params=trainable["model"],
            batch_stats=batch_stats,
            opt_state=opt_state,
            shadow=trainable["shadow"],
        ), metrics

    return engine.Program(init=init, step=step, make_batch=make_batch)
