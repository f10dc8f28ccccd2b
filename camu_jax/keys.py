"""JAX's threefry PRNG keys derived on the host, in numpy: bit-identical to `jax.random.key`,
`split` and `fold_in`, without compiling anything.

Run eagerly, each of those JAX functions is a program that XLA compiles (`jit(_threefry_seed)`,
`jit(_threefry_split)`, `jit(unstack)`, `jit(_threefry_fold_in)`...): a study that derives a
member's keys outside its compiled steps paid for five such programs. Keys here are key data
(`uint32[2]`, what `jax.random.key_data` returns); programs take them as data and wrap them
(`jax.random.wrap_key_data`) inside. `tests/test_keys.py` checks every function against JAX,
under both settings of `jax_threefry_partitionable`.
"""

from __future__ import annotations

import jax
import numpy as np

KEY_SHAPE = (2,)  # the key data of one threefry key
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x: np.ndarray, d: int) -> np.ndarray:
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(key: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Threefry-2x32 hash (20 rounds) of the count pairs `(x0, x1)` under `key`, as JAX's
    `threefry2x32_p` computes it."""
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x = [np.asarray(x0, np.uint32) + ks[0], np.asarray(x1, np.uint32) + ks[1]]
    with np.errstate(over="ignore"):
        for i in range(5):
            for r in _ROTATIONS[i % 2]:
                x[0] = x[0] + x[1]
                x[1] = _rotl(x[1], r) ^ x[0]
            x[0] = x[0] + ks[(i + 1) % 3]
            x[1] = x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x[0], x[1]


def key_data(seed: int) -> np.ndarray:
    """`jax.random.key_data(jax.random.key(seed))` for a seed in [0, 2**31)."""
    seed = int(seed)
    if not 0 <= seed < 2**31:
        raise ValueError(f"a seed must lie in [0, 2**31), got {seed}")
    return np.array([0, seed], np.uint32)


def split(key: np.ndarray, num: int) -> np.ndarray:
    """`[num, 2]`: the key data of `jax.random.split(wrap(key), num)`."""
    key = np.asarray(key, np.uint32)
    if jax.config.jax_threefry_partitionable:
        hi, lo = np.zeros(num, np.uint32), np.arange(num, dtype=np.uint32)
        b0, b1 = threefry2x32(key, hi, lo)
        return np.stack([b0, b1], axis=1)
    counts = np.arange(2 * num, dtype=np.uint32)
    b0, b1 = threefry2x32(key, counts[:num], counts[num:])
    return np.concatenate([b0, b1]).reshape(num, 2)


def fold_in(key: np.ndarray, data: int) -> np.ndarray:
    """The key data of `jax.random.fold_in(wrap(key), data)`, for `data` in [0, 2**32)."""
    data = int(data)
    if not 0 <= data < 2**32:
        raise ValueError(f"fold_in data must lie in [0, 2**32), got {data}")
    b0, b1 = threefry2x32(
        np.asarray(key, np.uint32), np.zeros(1, np.uint32), np.array([data], np.uint32)
    )
    return np.array([b0[0], b1[0]], np.uint32)
