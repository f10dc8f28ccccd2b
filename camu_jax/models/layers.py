"""Layers whose semantics must match PyTorch exactly (pooling, BatchNorm, padded convolutions),
and the CPU weight-gradient chunking of `conv2d`."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pool, stride 2, floor mode, on `[batch, height, width, channels]`.

    Written as reshape + max: XLA's generic `reduce_window` backward is 1.6-2x slower on CPU.
    """
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class BatchNorm(nn.Module):
    """BatchNorm2d with PyTorch semantics and an optional example mask.

    Differences from `flax.linen.BatchNorm` that matter for parity with the reference:
    the running variance is updated with the *unbiased* batch variance, `momentum` is
    PyTorch's (weight of the new statistic), and `mask` (`[batch]`) excludes padded
    examples from the statistics so a padded last batch behaves like PyTorch's short one.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,))
        if train:
            mean, var, count = masked_moments(x, mask)
            if not self.is_initializing():
                ra_mean.value, ra_var.value = running_update(
                    ra_mean.value, ra_var.value, mean, var, count, self.momentum
                )
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        return y * scale + bias


def masked_moments(x: jax.Array, mask: jax.Array | None):
    """`(mean, var, count)` over every axis but the last, of the rows `mask` (`[batch]`, None:
    all) marks; `var` biased, as PyTorch normalises with."""
    features = x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    if mask is None:
        weights = jnp.ones(x.shape[:1], x.dtype)
    else:
        weights = mask.astype(x.dtype)
    weights = weights.reshape((-1,) + (1,) * (x.ndim - 1))
    count = jnp.sum(weights) * (x.size // (x.shape[0] * features))
    # Padded rows may hold anything: select them away before summing.
    xm = jnp.where(weights > 0, x, 0.0)
    mean = jnp.sum(xm * weights, axis=axes) / jnp.maximum(count, 1)
    var = jnp.sum(jnp.square(xm - mean) * weights, axis=axes) / jnp.maximum(count, 1)
    return mean, var, count


def running_update(ra_mean, ra_var, mean, var, count, momentum: float):
    """PyTorch's running statistics after one batch: momentum is the new statistic's weight,
    the variance is the unbiased one; an all-padding batch leaves them alone."""
    unbiased = var * count / jnp.maximum(count - 1, 1)
    seen = count > 0
    m = momentum
    return (
        jnp.where(seen, (1 - m) * ra_mean + m * mean, ra_mean),
        jnp.where(seen, (1 - m) * ra_var + m * unbiased, ra_var),
    )


# PyTorch's default Linear/Conv init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)) for the
# weight, U(+-1/sqrt(fan_in)) for the bias. Matching it keeps training dynamics comparable.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_dense(features: int, fan_in: int, name: str) -> nn.Dense:
    return nn.Dense(
        features, kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in), name=name
    )


# On CPU, XLA's weight gradient of a convolution over a whole batch is far slower than the sum
# of the weight gradients over chunks of 8 examples (same math): at batch 32, 0.69 vs 0.14 s for
# ResNet18's 32x32, 64-channel 3x3 layers and 6.3 vs 3.4 ms for the MNIST CNN's conv2, measured
# side by side on a 2-core EPYC (docs/benchmarks.md). Input gradients and forward passes do not
# gain. GPUs and TPUs keep the plain convolution.
WGRAD_CHUNK = 8


def _lax_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_chunked_wgrad(x, kernel, stride, padding):
    return _lax_conv(x, kernel, stride, padding)


def _chunked_fwd(x, kernel, stride, padding):
    return _lax_conv(x, kernel, stride, padding), (x, kernel)


def _chunked_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    _, vjp_x = jax.vjp(lambda x: _lax_conv(x, kernel, stride, padding), x)
    (dx,) = vjp_x(g)
    dk = None
    for i in range(0, x.shape[0], WGRAD_CHUNK):
        xi, gi = x[i : i + WGRAD_CHUNK], g[i : i + WGRAD_CHUNK]
        _, vjp_k = jax.vjp(lambda k, xi=xi: _lax_conv(xi, k, stride, padding), kernel)
        (d,) = vjp_k(gi)
        dk = d if dk is None else dk + d
    return dx, dk


_conv_chunked_wgrad.defvjp(_chunked_fwd, _chunked_bwd)


# On CPU, XLA runs the grouped convolutions that `vmap` makes of a population's convolutions
# (one kernel per member) far slower per FLOP than ordinary ones: 0.76 vs 1.8 ms per member for
# the digits CNN's training step as patch matrix products, 2 CPU devices, 20 members
# (docs/benchmarks.md). The engine switches to them while it traces a program that runs more
# than one member per CPU device; a contextvar read at trace time, like WGRAD_CHUNK.
_PATCH_MATMUL: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "patch_matmul", default=None
)


@contextlib.contextmanager
def patch_matmul_convolutions(enable: bool | None = True):
    """Within this context (at trace time), `conv2d` computes convolutions as products of patch
    matrices (`im2col`, True) or as XLA convolutions (False) in every layer: the same values
    up to rounding. None: each layer's own choice (`patch_form_wins`)."""
    token = _PATCH_MATMUL.set(enable)
    try:
        yield
    finally:
        _PATCH_MATMUL.reset(token)


def _patch_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    kh, kw, cin, cout = kernel.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho = (x.shape[1] + 2 * padding - kh) // stride + 1
    wo = (x.shape[2] + 2 * padding - kw) // stride + 1
    cols = [
        xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = jnp.concatenate(cols, axis=-1)  # [b, ho, wo, kh * kw * cin], (i, j, c) order
    return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(kh * kw * cin, cout))


def patch_form_wins(x_shape, kernel_shape, stride: int, padding: int) -> bool:
    """Whether a single model's convolution runs faster on CPU as a patch-matrix product than
    as XLA's convolution (its recorded model, from the layer shapes; other backends: never).

    XLA:CPU's convolution is slow where the kernel covers most of a small image: forward and
    both gradients of the digits CNN's conv2 (5x5, padding 2, 4x4x16 -> 32) took 22.0 ms as
    XLA's convolution against 3.2 ms as patches at batch 256, 3.6 against 0.6 ms at batch 32
    (2-core EPYC, `python -m experiments.benchmark --only convs`, docs/benchmarks.md). Where
    the output has more positions than the kernel has taps XLA wins or nearly ties: MNIST's
    conv2 (14x14x16 -> 32) 3.3 against 5.0 ms at batch 32, 22 against 79 ms at 256; MNIST's
    conv1 (28x28x1 -> 16) 17.6 against 30.8 ms at 256 (2.4 against 2.1 ms at 32). One input
    channel on a small image favours patches too: digits' conv1 (8x8x1 -> 16, 64 positions)
    1.8 against 1.0 ms at 256, 0.39 against 0.30 at 32. So: patches when the layer has at most
    `kh * kw` output positions, or one input channel and at most `4 * kh * kw` (every ResNet
    layer and both of MNIST's keep XLA's)."""
    if jax.default_backend() != "cpu":
        return False
    _, h, w, cin = x_shape
    kh, kw = kernel_shape[:2]
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    return ho * wo <= kh * kw or (cin == 1 and ho * wo <= 4 * kh * kw)


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0) -> jax.Array:
    """`[b, h, w, c_in]` x `[kh, kw, c_in, c_out]` convolution with symmetric zero padding (as
    PyTorch pads). On CPU, populations use patch matrix products, a single model's layers
    where `patch_form_wins`, and XLA's stride-1 multi-channel convolutions take their weight
    gradient in chunks of `WGRAD_CHUNK` examples (see above); the values are the same up to
    rounding."""
    forced = _PATCH_MATMUL.get()
    if forced or (forced is None and patch_form_wins(x.shape, kernel.shape, stride, padding)):
        return _patch_conv(x, kernel, stride, padding)
    b = x.shape[0]
    if (
        jax.default_backend() == "cpu"
        and stride == 1
        and kernel.shape[0] > 1
        and kernel.shape[2] > 1
        and b > WGRAD_CHUNK
        and b % WGRAD_CHUNK == 0
    ):
        return _conv_chunked_wgrad(x, kernel, stride, padding)
    return _lax_conv(x, kernel, stride, padding)


class Conv(nn.Module):
    """A square, symmetric-padding convolution with `nn.Conv`'s parameters (`kernel`, `bias`)
    and initialisers, computed by `conv2d`."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        y = conv2d(x, kernel.astype(x.dtype), stride=self.stride, padding=self.padding)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,)).astype(x.dtype)
        return y


def torch_conv(features: int, kernel: int, in_features: int, padding: int, name: str) -> Conv:
    return Conv(
        features,
        kernel,
        padding=padding,
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(in_features * kernel * kernel),
        name=name,
    )
