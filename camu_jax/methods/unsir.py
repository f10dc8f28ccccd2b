"""UNSIR (Tarun, Chundawat, Mandal, Kankanhalli, "Fast Yet Effective Machine Unlearning", IEEE
TNNLS 2023, arXiv 2111.08947; official notebook `vikram2000b/Fast-Machine-Unlearning`,
`Machine Unlearning.ipynb`): error-maximising noise, then impair and repair, two stages of one
`LossMethod` (`loss_program` with each stage's Adam).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from camu_jax import keys as host_keys
from camu_jax import sharding
from camu_jax.methods.base import Stage, stream_batch
from camu_jax.methods.finetune import LossMethod, ce, forward, loss_program, setting
from camu_jax.methods.mixing import merge, per_class_subset, union_plan
from camu_jax.models import apply_model
from camu_jax.steps import adam_l2_traced, cast_like

_NOISE_TAG = 0x0315


@dataclasses.dataclass(frozen=True)
class Unsir(LossMethod):
    """UNSIR: learn *error-maximising noise* for the forgotten labels against the frozen
    original, then **impair** (one epoch, Adam lr 0.02, on the shuffled union of the noise,
    repeated, and a small subset of D_r) and **repair** (one epoch, Adam lr 0.01, on the D_r
    subset alone).

    Noise (official notebook): a batch of `noise_size` (256) inputs, N(0, 1) in the model's
    normalised input space, optimised by Adam (lr 0.1) for 5 epochs x 8 steps = 40 steps on
    `-CE(f(noise), y) + 0.1 * mean_i ||noise_i||^2`; impair uses it repeated
    `noise_repeats` (20) times; the D_r subset is 1000 items per remaining class; batches of
    256. Done here in `prepare`, every member's noise at once (vmapped), against its frozen
    original in train mode (BatchNorm on batch statistics, as the notebook's freshly loaded
    model), the original's running statistics left alone.

    Labels of the noise: slot j carries the label of a D_f item (a seeded draw cycling over
    D_f). For class removal every slot carries the forgotten class (with several forgotten
    classes, slots split in proportion to their D_f shares; the notebook learns 256 slots per
    class and, by a slip (`class_num = 0`), labels every noise item 0). UNSIR is a
    class-removal method: on random removal its noise carries D_f's label mix, so impair
    degrades those classes as a whole and repair restores them; it does not target the items.

    For the MNIST CNN the impair/repair learning rates are tuned (docs/methods.md, "unsir").
    """

    name = "unsir"
    title = "UNSIR"
    settings_as_data = True  # noise_lr, noise_weight, impair_lr, repair_lr

    noise_size: int = 256
    noise_steps: int = 40
    noise_lr: float = 0.1
    noise_weight: float = 0.1  # the lambda of the noise's L2 term
    noise_repeats: int = 20
    retain_per_class: int = 1000
    impair_lr: float = 0.002  # MNIST CNN, tuned (docs/methods.md)
    repair_lr: float = 0.001  # MNIST CNN, tuned (docs/methods.md)
    impair_epochs: int = 1
    repair_epochs: int = 1  # MNIST CNN, tuned (docs/methods.md)
    batch_size: int = 256

    def _nonneg(self):
        return ("noise_weight",)

    def member_arrays(self, ctx):
        forget_labels = ctx.labels[ctx.forget]
        order = ctx.rng(_NOISE_TAG).permutation(len(forget_labels))
        slots = order[np.arange(self.noise_size) % len(order)]
        return {
            "noise_y": forget_labels[slots].astype(np.int32),
            "unsir_key": host_keys.fold_in(host_keys.key_data(ctx.seed), _NOISE_TAG),
        }

    def prepare(self, model, originals, data, host):
        noise = error_maximising_noise(
            model,
            originals,
            data,
            host["noise_y"],
            host["unsir_key"],
            steps=self.noise_steps,
            learning_rate=setting(self, host, "noise_lr"),
            weight=setting(self, host, "noise_weight"),
        )
        return {"noise": noise}

    def subset(self, ctx) -> np.ndarray:
        """Positions in D_r of the impair/repair subset (fixed per run)."""
        return per_class_subset(
            ctx.rng(_NOISE_TAG, 1), ctx.labels[ctx.remain], self.retain_per_class
        )

    def impair_plan(self, ctx, epoch):
        noise = np.tile(np.arange(self.noise_size), self.noise_repeats)
        return union_plan(
            ctx.rng(_NOISE_TAG, 2, epoch), {"noise": noise, "r": self.subset(ctx)}, self.batch_size
        )

    def repair_plan(self, ctx, epoch):
        plan = union_plan(ctx.rng(_NOISE_TAG, 3, epoch), {"r": self.subset(ctx)}, self.batch_size)
        # Same row layout as impair, so one program serves both stages.
        plan["noise_ids"] = np.zeros_like(plan["r_ids"])
        plan["noise_mask"] = np.zeros_like(plan["r_mask"])
        return plan

    def make_batch(self, model, spec, mesh):
        make = stream_batch(self, spec, mesh)

        def make_batch(state, shared, member, row):
            b = make(state, shared, member, row)
            noise = {
                "x": member["noise"][b["noise_ids"]],
                "y": member["noise_y"][b["noise_ids"]],
                "mask": b["noise_mask"],
            }
            batch = sharding.constrain_batch(merge([b["remain"], noise]), mesh)
            if "settings" in b:
                batch["settings"] = b["settings"]
            return batch

        return make_batch

    def loss(self, model, params, batch_stats, batch, extra):
        logits, _, batch_stats = forward(model, params, batch_stats, batch)
        return ce(logits, batch["y"], batch["mask"]), (batch_stats, {})

    def impair_tx(self, batch=None):
        # The notebook's Adam(lr): no weight decay.
        return adam_l2_traced(setting(self, batch or {}, "impair_lr"), 0.0)

    def repair_tx(self, batch=None):
        return adam_l2_traced(setting(self, batch or {}, "repair_lr"), 0.0)

    def stages(self):
        # Repair starts a fresh Adam, as the notebook.
        return (
            Stage(
                "impair",
                functools.partial(loss_program, self, tx=self.impair_tx),
                self.impair_plan,
                self.impair_epochs,
            ),
            Stage(
                "repair",
                functools.partial(loss_program, self, tx=self.repair_tx),
                self.repair_plan,
                self.repair_epochs,
            ),
        )


@functools.lru_cache(maxsize=16)
def _noise_program(model, mesh, shape: tuple[int, ...]):
    def tx(learning_rate):
        return adam_l2_traced(learning_rate, 0.0)  # the notebook's Adam(lr): no weight decay

    def loss(noise, variables, labels, weight):
        logits, _, _ = apply_model(
            model, variables["params"], variables["batch_stats"], noise, train=True
        )
        sq = jnp.sum(jnp.square(noise), axis=tuple(range(1, noise.ndim)))
        mean_sq = jnp.mean(sq)
        return -ce(logits, labels, jnp.ones_like(sq)) + cast_like(weight, mean_sq) * mean_sq

    def one(noise, opt_state, key, first, move, variables, labels, learning_rate, weight):
        # One program for the start and the steps: at `first` the noise and Adam's state
        # start afresh (a select, so the values are those of a program of their own); `move`
        # False returns the start itself (zero steps).
        fresh = jax.random.normal(jax.random.wrap_key_data(key), shape, jnp.result_type(float))
        noise = jnp.where(first, fresh, noise)
        opt_state = jax.tree.map(
            lambda z, o: jnp.where(first, z, o), tx(0.0).init(fresh), opt_state
        )  # the state does not depend on the rate
        grads = jax.grad(loss)(noise, variables, labels, weight)
        updates, moved_state = tx(learning_rate).update(grads, opt_state, noise)
        moved = optax.apply_updates(noise, updates)
        return (
            jnp.where(move, moved, noise),
            jax.tree.map(lambda m, o: jnp.where(move, m, o), moved_state, opt_state),
        )

    vstep = sharding.vmap_members(one, mesh, (0, 0, 0, None, None, 0, 0, 0, 0))

    def pin(tree):
        return sharding.constrain_members(tree, mesh)

    def empty(members):
        """Host zeros of the noise and Adam's state for `members` (the first call's inputs,
        replaced inside it)."""
        abstract = jax.ShapeDtypeStruct(shape, jnp.result_type(float))
        state = jax.eval_shape(lambda n: tx(0.0).init(n), abstract)
        zeros = jax.tree.map(lambda x: np.zeros((members, *x.shape), x.dtype), (abstract, state))
        return sharding.shard_members(zeros, mesh)

    return jax.jit(lambda *a: pin(vstep(*a)), donate_argnums=(0, 1)), empty


def error_maximising_noise(
    model, originals, data, labels, keys, *, steps, learning_rate, weight
) -> jax.Array:
    """`[P, K, *input_shape]`: per member, K inputs (model input space) that maximise the
    frozen original's cross-entropy with `labels` (`[P, K]`) under an L2 penalty `weight`:
    Adam (rate `learning_rate`) from N(0, 1) (seeded by `keys`, `[P]` key data) for `steps`
    full-batch steps. `learning_rate` and `weight`: numbers, or one per member (`[P]`: data,
    one compiled program serves every value)."""
    mesh = data.mesh
    labels = np.asarray(labels, np.int32)
    shape = (labels.shape[1], *data.input_shape)
    step, start = _noise_program(model, mesh, shape)
    dtype = jax.dtypes.canonicalize_dtype(np.float64)

    def per_member(value):
        return np.broadcast_to(np.asarray(value, dtype), labels.shape[:1])

    placed = sharding.shard_members(
        {
            "keys": np.asarray(keys),
            "y": labels,
            "lr": per_member(learning_rate),
            "weight": per_member(weight),
        },
        mesh,
    )
    noise, opt_state = start(labels.shape[0])
    sync = sharding.needs_sync(mesh)
    for i in range(max(steps, 1)):
        noise, opt_state = step(
            noise,
            opt_state,
            placed["keys"],
            np.bool_(i == 0),
            np.bool_(steps > 0),
            originals,
            placed["y"],
            placed["lr"],
            placed["weight"],
        )
        if sync:  # fake CPU devices can deadlock in a collective unless each call is waited for
            jax.block_until_ready(noise)
    return noise
