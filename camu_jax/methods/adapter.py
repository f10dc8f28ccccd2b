"""Methods from outside the engine: a plain function `unlearning(variables, retain, forget,
validation) -> variables`, the field's common signature (the NeurIPS 2023 unlearning
challenge's `unlearning(net, retain_loader, forget_loader, val_loader) -> net`), as a method of
a study.

`from_function(fn, name=...)` wraps such a function as a `FunctionMethod`, which
`camu_jax.compare` and `camu_jax.run_study` run beside the population methods, one run (member)
at a time: no population, no compiled program of the engine, no checkpoint during unlearning.
Per run the function gets

* `variables`: the original model's `{'params', 'batch_stats'}` (`batch_stats` `{}` for a model
  without BatchNorm), as writable host numpy copies: the function may change them in place;
* `retain`, `forget`, `validation`: `Examples` of D_r, D_f (each item once) and the study's
  test set (what TA and the attacks use: a function that tunes on it reports an optimistic
  TA). An `Examples` has `x` (float32 `[n, H, W, C]`, as the model takes them: scaled,
  normalised and resized as the study's data says, never augmented) and `y` (int32 `[n]`),
  materialised on first use, and `batches(batch_size, epoch=...)`, shuffled `(x, y)` batches
  preprocessed one at a time (for data too large to hold at once);

and returns the unlearned variables: a tree of the same structure and shapes (arrays of any
kind; floats are cast to the original's dtypes). Its wall time, the first fetch of its result
included, is the run's `seconds` (and JAX's compile time inside it `compile_seconds`). A result
with a non-finite value diverged (`on_divergence`); another structure or shape is refused with
a ValueError naming the leaf.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from camu_jax import engine, sharding
from camu_jax.data.pipeline import DeviceData, InputSpec, preprocess
from camu_jax.data.splits import Splits
from camu_jax.methods.base import Method

# Rows preprocessed per call when `Examples.x` materialises a whole set.
CHUNK = 1024
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """One set of examples a function method gets: `rows` of `images` (the study's data, on
    the host) with their `labels`; `seed` is the run's (for the function's own randomness)."""

    images: np.ndarray
    labels: np.ndarray
    rows: np.ndarray
    spec: InputSpec
    seed: int

    def __len__(self) -> int:
        return len(self.rows)

    @functools.cached_property
    def x(self) -> np.ndarray:
        """Every item, as the model takes it: float32 `[n, H, W, C]`."""
        parts = [self._inputs(self.rows[i : i + CHUNK]) for i in range(0, len(self), CHUNK)]
        if not parts:
            return self._inputs(self.rows)
        return np.concatenate(parts)

    @functools.cached_property
    def y(self) -> np.ndarray:
        """Every item's label: int32 `[n]`."""
        return self.labels[self.rows].astype(np.int32)

    def batches(
        self, batch_size: int, *, epoch: int = 0, shuffle: bool = True, drop_last: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`(x [b, H, W, C], y [b])` batches over every item once, preprocessed one batch at a
        time; shuffled by `(seed, epoch)` (the same order for the same epoch), the last batch
        short unless `drop_last`."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        order = np.arange(len(self))
        if shuffle:
            order = np.random.default_rng([self.seed, 11, epoch]).permutation(len(self))
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for i in range(0, stop, batch_size):
            rows = self.rows[order[i : i + batch_size]]
            yield self._inputs(rows), self.labels[rows].astype(np.int32)

    def _inputs(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(preprocess(self.images[rows], self.spec), np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class FunctionMethod(Method):
    """A method that is a plain function (`from_function`): `name` names its row, `function`
    (`module.qualname`) is what records show of it; the callable is `fn`."""

    title = "function"
    name: str
    function: str

    @property
    def fn(self) -> Callable:
        return self.__dict__["_fn"]

    def stages(self):
        raise TypeError(
            f"{self.name} is a function method: it runs member by member (`run_function`), "
            "not as a population"
        )


def from_function(fn: Callable, *, name: str) -> FunctionMethod:
    """`fn(variables, retain, forget, validation) -> variables` as a method named `name`
    (its row in the results): see the module docstring for what it gets and returns. `name`
    must be an identifier-like word (letters, digits, `_`, `.`, `-`) that no registered
    method and no baseline (`original`, `retrain`) holds."""
    from camu_jax.methods import REGISTRY

    if not callable(fn):
        raise TypeError(f"from_function needs a callable, got {fn!r}")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"method name {name!r}: use letters, digits, '_', '.' or '-' (a row and folder name)"
        )
    if name in REGISTRY or name in ("original", "retrain"):
        raise ValueError(f"method name {name!r} is taken (a registered method or a baseline)")
    qualname = getattr(fn, "__qualname__", type(fn).__qualname__)
    method = FunctionMethod(name=name, function=f"{getattr(fn, '__module__', '?')}.{qualname}")
    method.__dict__["_fn"] = fn  # not a field: records hold `function`, the name
    return method


def run_function(
    method: FunctionMethod,
    originals: Sequence[dict],
    *,
    data: DeviceData,
    validation: DeviceData,
    splits: Sequence[Splits],
    seeds: Sequence[int],
    names: Sequence[str],
    on_divergence: str = "raise",
) -> list[tuple[dict | None, dict]]:
    """Runs `method.fn` from every `originals[i]` on `splits[i]`, `seeds[i]`, one after the
    other; returns per member `(variables, info)` as `run_population` does (`variables` None
    and `info["diverged"]` for a non-finite result under `on_divergence="record"`; "raise"
    raises FloatingPointError naming the member)."""
    images, labels = sharding.fetch(data.images), data.host_labels
    val_images = sharding.fetch(validation.images)
    out = []
    for start, sp, seed, name in zip(originals, splits, seeds, names, strict=True):
        retain = Examples(images, labels, sp.remain, data.spec, seed)
        forget = Examples(images, labels, sp.forget, data.spec, seed)
        val = Examples(
            val_images,
            validation.host_labels,
            np.arange(validation.size),
            validation.spec,
            seed,
        )
        given = jax.tree.map(np.array, start)  # writable copies: the original stays as it is
        timer = engine.Timer()
        try:
            result = jax.tree.map(np.asarray, method.fn(given, retain, forget, val))
        except Exception as e:
            e.add_note(f"in function method {method.name} ({method.function}) on {name}")
            raise
        seconds, compile_seconds = timer.seconds, timer.compile_seconds
        # The keys of `runner.run`'s info: no steps, losses or logs the engine could see.
        info = {
            "seconds": seconds,
            "run_seconds": seconds - compile_seconds,
            "compile_seconds": compile_seconds,
            "construct_seconds": 0.0,
            "epochs_run": 1,
            "resumed_from": 0,
            "steps": 0,
            "losses": [],
            "epochs": [],
            "log_dir": None,
        }
        variables = _conform(result, start, f"{method.name} on {name}")
        if bad := _nonfinite(variables):
            why = f"{method.name} returned non-finite values on {name} ({bad})"
            if on_divergence == "raise":
                raise FloatingPointError(why)
            out.append((None, {**info, "diverged": why}))
            continue
        out.append((variables, info))
    return out


def _conform(result, start: dict, where: str) -> dict:
    """`result` as `start`'s tree (its dtypes), or a ValueError naming the first difference."""
    want = jax.tree_util.tree_flatten_with_path(start)[0]
    if not isinstance(result, dict) or "params" not in result:
        raise ValueError(
            f"{where}: returned {type(result).__name__} without 'params', not the variables "
            "{'params', 'batch_stats'} it was given"
        )
    got = dict(jax.tree_util.tree_flatten_with_path(result)[0])
    names = {jax.tree_util.keystr(p) for p, _ in want}
    if extra := sorted(
        jax.tree_util.keystr(p) for p in got if jax.tree_util.keystr(p) not in names
    ):
        raise ValueError(f"{where}: returned leaves the model does not have: {', '.join(extra)}")
    leaves = []
    for path, ref in want:
        if path not in got:
            raise ValueError(f"{where}: returned no {jax.tree_util.keystr(path)}")
        value = got[path]
        if value.shape != ref.shape:
            raise ValueError(
                f"{where}: {jax.tree_util.keystr(path)} has shape {value.shape}, the model's "
                f"{ref.shape}"
            )
        leaves.append(np.asarray(value, ref.dtype))
    return jax.tree.unflatten(jax.tree.structure(start), leaves)


def _nonfinite(variables: dict) -> str | None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        if np.issubdtype(leaf.dtype, np.floating) and not np.isfinite(leaf).all():
            return f"{jax.tree_util.keystr(path)} holds NaN or inf"
    return None
