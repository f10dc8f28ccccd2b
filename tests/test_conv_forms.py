"""The convolution form of a single model on CPU (`layers.patch_form_wins`): which layers run as
patch-matrix products, and that both forms compute the same convolution up to rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from camu_jax.models import layers


@pytest.mark.parametrize(
    ("x_shape", "kernel_shape", "padding", "patch"),
    [
        ((256, 8, 8, 1), (5, 5, 1, 16), 2, True),  # digits conv1: one channel, 64 positions
        ((256, 4, 4, 16), (5, 5, 16, 32), 2, True),  # digits conv2: 16 positions, 25 taps
        ((32, 28, 28, 1), (5, 5, 1, 16), 2, False),  # MNIST conv1: 784 positions
        ((32, 14, 14, 16), (5, 5, 16, 32), 2, False),  # MNIST conv2: 196 positions
        ((32, 32, 32, 3), (3, 3, 3, 64), 1, False),  # ResNet18 (CIFAR) stem
        ((32, 4, 4, 512), (3, 3, 512, 512), 1, False),  # its last stage: 16 positions > 9
    ],
)
def test_the_rule_picks_patches_where_xla_is_slow(x_shape, kernel_shape, padding, patch):
    assert layers.patch_form_wins(x_shape, kernel_shape, 1, padding) is patch


def test_other_backends_keep_xla_convolutions(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not layers.patch_form_wins((256, 4, 4, 16), (5, 5, 16, 32), 1, 2)


@pytest.mark.parametrize(
    ("x_shape", "kernel_shape"),
    [((64, 4, 4, 1), (5, 5, 1, 16)), ((64, 4, 4, 16), (5, 5, 16, 32))],
)
def test_both_forms_give_the_same_values_and_gradients_up_to_rounding(x_shape, kernel_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
    g = jnp.asarray(rng.normal(size=(*x_shape[:3], kernel_shape[-1])), jnp.float32)

    def outputs(patch):
        with layers.patch_matmul_convolutions(patch):
            y, vjp = jax.vjp(lambda x, k: layers.conv2d(x, k, padding=2), x, k)
        return (y, *vjp(g))

    auto, xla, patch = outputs(None), outputs(False), outputs(True)
    for a, p in zip(auto, patch, strict=True):  # the rule picks patches for these layers
        np.testing.assert_array_equal(a, p)
    # Both forms sum the same products in another order: each result differs by at most
    # n * eps times the sum of the magnitudes of its n terms (float32 eps = 2**-24 per
    # rounding, first order), computed here as the same convolutions of |x|, |k| and |g|.
    eps = 2.0**-24
    with layers.patch_matmul_convolutions(False):
        abs_y, abs_vjp = jax.vjp(
            lambda x, k: layers.conv2d(x, k, padding=2), jnp.abs(x), jnp.abs(k)
        )
        abs_dx, abs_dk = abs_vjp(jnp.abs(g))
    kh, kw, cin, cout = kernel_shape
    terms = (kh * kw * cin, kh * kw * cout, x_shape[0] * x_shape[1] * x_shape[2])
    for x_val, p_val, magnitude, n in zip(xla, patch, (abs_y, abs_dx, abs_dk), terms, strict=True):
        bound = 2 * n * eps * np.asarray(magnitude)
        assert np.all(np.abs(np.asarray(x_val) - np.asarray(p_val)) <= bound)
