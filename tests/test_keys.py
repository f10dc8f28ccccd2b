"""Host-side threefry keys (`camu_jax.keys`) against JAX's own, bit for bit."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from camu_jax import keys

SEEDS = [0, 1, 2, 7, 42, 1234, 2**16 + 3, 2**31 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_key_data_split_and_fold_in_equal_jax(seed):
    key = jax.random.key(seed)
    data = keys.key_data(seed)
    np.testing.assert_array_equal(data, np.asarray(jax.random.key_data(key)))
    for num in (1, 2, 3, 5):
        np.testing.assert_array_equal(
            keys.split(data, num), np.asarray(jax.random.key_data(jax.random.split(key, num)))
        )
    for tag in (0, 1, 3, 99, 2**31 + 5, 2**32 - 1):
        np.testing.assert_array_equal(
            keys.fold_in(data, tag),
            np.asarray(jax.random.key_data(jax.random.fold_in(key, tag))),
        )


def test_the_other_split_scheme_equals_jax_too():
    """`jax_threefry_partitionable` changes `split` (its default changed in JAX 0.5): both."""
    code = (
        "import jax, numpy as np\n"
        "flag = 'jax_threefry_partitionable'\n"
        "jax.config.update(flag, not getattr(jax.config, flag))\n"
        "from camu_jax import keys\n"
        "for s in (0, 3, 12345):\n"
        "    k = jax.random.key(s)\n"
        "    for n in (1, 3, 4):\n"
        "        want = np.asarray(jax.random.key_data(jax.random.split(k, n)))\n"
        "        assert (keys.split(keys.key_data(s), n) == want).all(), (s, n)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_bad_seeds_and_data_are_named():
    with pytest.raises(ValueError, match="-1"):
        keys.key_data(-1)
    with pytest.raises(ValueError, match=str(2**31)):
        keys.key_data(2**31)
    with pytest.raises(ValueError, match=str(2**32)):
        keys.fold_in(keys.key_data(0), 2**32)
