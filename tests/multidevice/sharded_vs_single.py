"""Run in its own process (8 fake CPU devices); prints JSON with max differences.

The sharded steps and loops must equal their single-device versions. Each step is waited for:
on jax 0.10.2 a loop over fake devices can deadlock in an all-reduce otherwise.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
# float64 end to end: the comparison is then about the function the sharded program computes,
# not about float32 summation order (which Adam's first step, ~lr * sign(g), would amplify).
os.environ["JAX_ENABLE_X64"] = "1"

import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from camu_jax import sharding  # noqa: E402
from camu_jax.data.pipeline import DeviceData, InputSpec  # noqa: E402
from camu_jax.data.splits import ForgetSpec, make_splits  # noqa: E402
from camu_jax.methods.camu import (  # noqa: E402
    CamuCoefficients,
    CamuConfig,
    camu_step,
    init_camu_state,
    unlearn,
)
from camu_jax.models import BatchNorm, create_model, init_variables  # noqa: E402
from camu_jax.steps import adam_l2  # noqa: E402
from camu_jax.training import TrainConfig, train_model  # noqa: E402


def maxdiff(a, b):
    leaves = jax.tree.leaves(
        jax.tree.map(
            lambda x, y: np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))), a, b
        )
    )
    return float(max(leaves))


class TinyBN(nn.Module):
    """conv -> BatchNorm -> ReLU -> pool -> embedding -> logits: BatchNorm statistics must be
    reduced across devices exactly like on one device. (ResNet18 takes minutes to compile on
    8 fake devices; the layers are the same.)"""

    head_modules = ("Dense_1",)  # The logits layer, after the embedding.

    @nn.compact
    def __call__(self, x, *, train=False, mask=None):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.relu(BatchNorm()(x, train=train, mask=mask))
        emb = nn.Dense(16)(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(10)(emb), emb


def f64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def main():
    assert jax.device_count() == 8, jax.devices()
    out = {"devices": jax.device_count()}
    single = sharding.make_mesh(jax.devices()[:1])
    multi = sharding.make_mesh()
    rng = np.random.default_rng(0)

    # 1. One CaMU double step, ResNet18 (CIFAR stem) so BatchNorm statistics are reduced too.
    model = TinyBN()
    v = f64(init_variables(model, jax.random.key(0), (8, 8, 3)))
    kl_tx, ce_tx = adam_l2(4e-4), adam_l2(1e-3)
    step = jax.jit(
        functools.partial(
            camu_step, model=model, kl_tx=kl_tx, ce_tx=ce_tx, coefficients=CamuCoefficients()
        )
    )
    b = 16
    batch = {
        "x_f": rng.normal(size=(b, 8, 8, 3)).astype(np.float32),
        "x_s": rng.normal(size=(b, 8, 8, 3)).astype(np.float32),
        "y_s": rng.integers(0, 10, b).astype(np.int32),
        "y_cf": rng.integers(0, 10, b).astype(np.int32),
        "z0_s": rng.normal(size=(b, 16)).astype(np.float32),
        "z0_cf": rng.normal(size=(b, 16)).astype(np.float32),
        "mask_f": np.r_[np.ones(b - 3), np.zeros(3)].astype(np.float32),
        "mask_s": np.r_[np.ones(b - 3), np.zeros(3)].astype(np.float32),
    }
    results = []
    for mesh in (single, multi):
        state = sharding.replicate(init_camu_state(v, kl_tx, ce_tx), mesh)
        for _ in range(2):
            state, metrics = step(state, sharding.shard_batch(f64(batch), mesh))
            jax.block_until_ready(state)
        results.append((state, metrics))
    out["camu_step"] = maxdiff(results[0][0].params, results[1][0].params)
    out["camu_step_bn"] = maxdiff(results[0][0].batch_stats, results[1][0].batch_stats)
    out["camu_step_loss"] = maxdiff(results[0][1], results[1][1])
    out["batch_sharded"] = str(sharding.shard_batch(batch, multi)["x_f"].sharding.spec)

    # 2. The training loop and CaMU loop on a small CNN problem (chunked scans).
    cnn = create_model("cnn", num_classes=10)
    n = 200
    images = rng.integers(0, 256, (n, 8, 8, 1)).astype(np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int32)
    splits = make_splits(labels, ForgetSpec(kind="class", classes=(3,)), seed=0, num_classes=10)
    finals = []
    for mesh in (single, multi):
        data = DeviceData.put(images, labels, spec=InputSpec(), mesh=mesh)
        v0 = f64(init_variables(cnn, jax.random.key(1), (8, 8, 1)))
        trained, _ = train_model(
            cnn,
            v0,
            data=data,
            items=np.arange(n),
            config=TrainConfig(epochs=1),
            seed=0,
            chunk_steps=1,
            progress=False,
        )
        un, _ = unlearn(
            cnn,
            trained,
            data=data,
            splits=splits,
            num_classes=10,
            config=CamuConfig(epochs=1),
            seed=0,
            chunk_steps=1,
            progress=False,
        )
        finals.append((trained, un))
    out["train_loop"] = maxdiff(finals[0][0], finals[1][0])
    out["camu_loop"] = maxdiff(finals[0][1], finals[1][1])

    # 3. A batch size the device count does not divide is refused with a clear message.
    try:
        sharding.check_batch_size(12, multi)
        out["indivisible_error"] = None
    except ValueError as e:
        out["indivisible_error"] = str(e)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
