"""The convolution form of a single model on CPU (`camu_jax.models.layers.patch_form_wins`):
each CNN layer's forward and both gradients as XLA's convolution against patch-matrix
products, alternated in one process, with the compile seconds of each apart.

    python -m experiments.benchmark --only convs --out FILE.json

The rule is right for a layer when the form it picks is the faster one here.
"""

from __future__ import annotations

import json
import time

import numpy as np

from .timing import alternate, median

# (name, batch, image side, input channels, output channels): the CNN's two 5x5, padding-2
# layers on digits (8x8) and MNIST (28x28), at the batches the methods use.
LAYERS = (
    ("digits_conv1_b256", 256, 8, 1, 16),
    ("digits_conv2_b256", 256, 4, 16, 32),
    ("digits_conv1_b32", 32, 8, 1, 16),
    ("digits_conv2_b32", 32, 4, 16, 32),
    ("mnist_conv1_b32", 32, 28, 1, 16),
    ("mnist_conv2_b32", 32, 14, 16, 32),
    ("mnist_conv1_b256", 256, 28, 1, 16),
    ("mnist_conv2_b256", 256, 14, 16, 32),
)


def bench_convs(*, repeats: int = 5, calls: int = 20, quick: bool = False) -> dict:
    import jax
    import jax.numpy as jnp

    from camu_jax.models import layers

    out = {}
    for name, b, side, cin, cout in LAYERS[:2] if quick else LAYERS:
        x = jnp.asarray(np.random.default_rng(0).normal(size=(b, side, side, cin)), jnp.float32)
        k = jnp.asarray(np.random.default_rng(1).normal(size=(5, 5, cin, cout)), jnp.float32)
        runners, compile_s = {}, {}
        for form, patch in (("xla", False), ("patch", True)):
            with layers.patch_matmul_convolutions(patch):

                def loss(x, k):
                    return jnp.sum(jnp.tanh(layers.conv2d(x, k, padding=2)))

                fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
                t = time.perf_counter()
                compiled = fn.lower(x, k).compile()
                compile_s[form] = time.perf_counter() - t
            jax.block_until_ready(compiled(x, k))

            def run(compiled=compiled, x=x, k=k):
                t = time.perf_counter()
                for _ in range(calls):
                    jax.block_until_ready(compiled(x, k))
                return (time.perf_counter() - t) / calls

            runners[form] = run
        times = alternate(runners, repeats)
        ms = {f: 1e3 * median(v) for f, v in times.items()}
        chosen = "patch" if layers.patch_form_wins(x.shape, k.shape, 1, 2) else "xla"
        faster = min(ms, key=ms.get)
        out[name] = {
            "xla_ms": ms["xla"],
            "patch_ms": ms["patch"],
            "xla_over_patch": ms["xla"] / ms["patch"],
            "xla_compile_s": compile_s["xla"],
            "patch_compile_s": compile_s["patch"],
            "rule_chooses": chosen,
            "faster": faster,
            "rule_right": chosen == faster,
            "backend": jax.default_backend(),
        }
        print(f"[benchmark]   convs.{name}: {json.dumps(out[name])}", flush=True)
    return out
