"""The loop engine: populations of runs stepped together, one compiled program per phase.

A *member* is one run of a phase: the original model of one seed, the retrain or the
unlearning of one (seed, forget set), one relearning check. Members are stacked along a leading
`member` axis (state, per-member device data, `[members, steps, batch]` index plans) and one
jitted call `vmap`s the pure per-member step over them; a population of one is the sequential
run. Plans are padded to the longest member: a step whose plan row holds no real example
leaves its member's state bit-identical (a select, not an update), so members of different
lengths, and waves of members, share one compiled program.

On accelerators a chunk of steps is one `lax.scan`. On CPU too, where the program runs one
member on each of several devices and computes no XLA convolution (the digits CNN, whose
small layers run as patch-matrix products); other programs run each step as its own jitted
call (`default_use_scan`: XLA:CPU runs convolutions inside a `while` loop 10-17x slower).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core
from jax.sharding import Mesh

from camu_jax import sharding
from camu_jax.models import layers, randomness

PyTree = Any
Plan = dict[str, np.ndarray]  # name -> [members, steps, batch] (host)


def default_use_scan() -> bool | None:
    """True on accelerators: a scanned chunk of steps per launch. None on CPU: per program
    (`Engine`), a scanned chunk where it runs one member on each of several devices and
    computes no XLA convolution, one jitted call per step otherwise. There a call per step
    waits for every device at every step, and the scan halves a member-step: the digits
    CNN's training in the engine, one member on each of 2 CPU devices, 0.48 against 1.0 ms
    (2026-12-07). Elsewhere the loop: XLA:CPU runs convolutions inside a `while` loop 10-17x
    slower (the MNIST CNN's training step: 76 against 4.5 ms), a stacked population's
    patch-matrix products slower too (MNIST, 2 members on each of 2 devices: 29 against 15
    ms a member-step), and one member on one device gains little (digits training 0.80
    against 1.03 ms in whole chunks, while the loop skips a chunk's padding rows and
    compiles faster: `--methods all` compiled 15 % more as scans, its phases no faster)."""
    return None if jax.default_backend() == "cpu" else True


def row_active(row: dict) -> jax.Array:
    """A plan row is active when one of its masks (keys containing `mask`) marks an example."""
    masks = [v for k, v in row.items() if "mask" in k]
    return sum(jnp.sum(m) for m in masks) > 0


def _tree_select(pred: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def all_finite(tree: PyTree) -> jax.Array:
    """True when every floating leaf of `tree` is finite (a scalar, for one member)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def member_program(fn: Callable, mesh: Mesh) -> Callable:
    """`fn(stacked, *args)` traced with CPU-friendly convolutions when it runs more than one
    member per CPU device (`layers.patch_matmul_convolutions`; one member: each layer's own
    choice, `layers.patch_form_wins`); decided at trace time from the member count of
    `stacked`'s leading axis. `CAMU_POPULATION_CONVS=xla|patch` forces one form wherever more
    than one member shares a device (for benchmarks)."""

    @functools.wraps(fn)
    def wrapped(stacked, *args):
        members = jax.tree.leaves(stacked)[0].shape[0]
        per_device = members // sharding.member_devices(mesh)
        choice = os.environ.get("CAMU_POPULATION_CONVS", "auto")
        if choice not in ("auto", "xla", "patch"):
            raise ValueError(f"CAMU_POPULATION_CONVS={choice!r}; allowed: auto, xla, patch")
        if per_device <= 1:
            form = None  # each layer's own choice (`layers.patch_form_wins`)
        elif choice == "auto":
            form = True if jax.default_backend() == "cpu" else None
        else:
            form = choice == "patch"
        with layers.patch_matmul_convolutions(form):
            return fn(stacked, *args)

    return wrapped


def member_step_key(state, member) -> jax.Array:
    """The key of a member's current step for its model's stochastic layers: its own key
    (`step_key`, or `key` for training) folded with `state.step`
    (`randomness.member_step_key`)."""
    data = None
    if isinstance(member, dict):
        data = member.get("step_key", member.get("key"))
    if data is None or not hasattr(state, "step"):
        raise TypeError(
            "this phase's members carry no key (`step_key` or `key`) or its state no `step` "
            "counter, so a model with stochastic layers gets no per-step keys here"
        )
    return randomness.member_step_key(data, state.step)


@dataclasses.dataclass(frozen=True)
class Program:
    """The pure pieces of one phase, for ONE member (the engine vmaps them).

    init: `variables -> state`: the phase's state from a model's `{'params', 'batch_stats'}`.
    step: `(state, batch) -> (state, metrics)`; metrics a flat dict of scalars with `finite`.
    make_batch: `(state, shared, member, row) -> batch`, inside jit: builds a step's batch from
      the device-resident `shared` data (images, labels), the member's own device data (index
      tables, teacher outputs, keys) and one plan row (`{name: [batch]}`).
    """

    init: Callable[[dict], PyTree]
    step: Callable[[PyTree, dict], tuple[PyTree, dict]]
    make_batch: Callable[[PyTree, PyTree, PyTree, dict], dict]


class Engine:
    """Runs `[members, k, batch]` plan chunks of a `Program` over a population.

    `state, metrics = engine(state, shared, member, plan)`: `state` and `member` carry the
    leading member axis (sharded over the mesh's `member` axis); metrics come back as host
    arrays `[k, members]` with `active` and `state_finite` (the state's floating leaves after
    each step). The state is donated. `engine.init(variables)` builds the stacked state.
    """

    def __init__(self, program: Program, mesh: Mesh, *, use_scan: bool | None = None):
        self.mesh = mesh
        # True, False, or None: per program, by its convolutions (`default_use_scan`), decided
        # once per signature of the state and data (the convolution form depends on the
        # members per device and the input shapes)
        self.use_scan = default_use_scan() if use_scan is None else use_scan
        self._scans: dict[tuple, bool] = {}
        # On jax 0.10.2, fake CPU devices can deadlock in a collective (XLA may insert one
        # even without a data axis) unless every step is waited for.
        self.sync = sharding.needs_sync(mesh)

        def one(state, shared, member, row):
            # Keys for stochastic layers (dropout): the member's, folded with the step counter;
            # computed only where a model asks for one (`randomness.step_rngs`).
            with randomness.step_rngs(lambda: member_step_key(state, member)):
                batch = program.make_batch(state, shared, member, row)
                new_state, metrics = program.step(state, batch)
            active = row_active(row)
            metrics = {k: jnp.where(active, v, jnp.zeros_like(v)) for k, v in metrics.items()}
            metrics["finite"] = jnp.logical_or(metrics.get("finite", True), ~active)
            metrics["active"] = active
            state = _tree_select(active, new_state, state)
            # The last step of a chunk can make the parameters non-finite while its loss,
            # computed before the update, is still finite.
            metrics["state_finite"] = all_finite(state)
            return state, metrics

        vstep = sharding.vmap_members(one, mesh, (0, None, 0, 0))

        # The state always leaves a program sharded over members, so that every call (the
        # first, from `init`, and the next, from a step) sees one input sharding: one compile.
        def pin(state):
            return sharding.constrain_members(state, mesh)

        def loop(state, shared, member, plan, j):
            # The chunk's plan is on device once; step j takes its row there (no transfer per
            # step).
            row = {
                k: jax.lax.dynamic_index_in_dim(v, j, axis=1, keepdims=False)
                for k, v in plan.items()
            }
            state, metrics = vstep(state, shared, member, row)
            return pin(state), metrics

        def scan(state, shared, member, plan):
            state, metrics = jax.lax.scan(lambda s, r: vstep(s, shared, member, r), state, plan)
            return pin(state), metrics

        self._one = jax.jit(member_program(loop, mesh), donate_argnums=0)
        self._scan = jax.jit(member_program(scan, mesh), donate_argnums=0)
        self._init = jax.jit(lambda v: pin(jax.vmap(program.init)(v)))
        self._host_init = jax.vmap(program.init)
        # Programs compiled for each signature (shapes, dtypes, shardings), and the seconds
        # each compile took (a persistent-cache hit takes little): `engine.place` weighs a
        # new layout's compile against what it could save.
        self._aot: dict = {}
        self._inits: dict = {}
        self.compile_seconds: dict = {}

    def compiled_count(self) -> int:
        """How many programs the engine holds (1 each when shapes are stable); for
        compile-once tests."""
        return len(self._inits) + len(self._aot)

    def init(self, variables: PyTree) -> PyTree:
        """The stacked state of stacked `variables` (host arrays, or a previous stage's state
        on device), sharded over the members. From host arrays, an init that only copies,
        casts, reshapes and fills (the optimizer's zeros, a copy of the weights) is evaluated
        on the host (`host_eval`): no program to compile."""
        leaves = jax.tree.leaves(variables)
        on_device = all(isinstance(x, jax.Array) for x in leaves)
        # A CPU device's arrays are host memory: read there too (one process holding them).
        if not on_device or (
            jax.default_backend() == "cpu" and all(x.is_fully_addressable for x in leaves)
        ):
            host = host_eval(self._host_init, variables)
            if host is not None:
                return sharding.shard_members(host, self.mesh)
        if not on_device:
            variables = sharding.shard_members(variables, self.mesh)
        key = _signature(self._init, (variables,))
        if key not in self._inits:
            self._inits[key] = compile_shared(self._init.lower(variables), (variables,))
        return self._inits[key](variables)

    def _args(self, scan: bool, state, shared, member, plan: Plan):
        if scan:
            rows = {k: np.swapaxes(v, 0, 1) for k, v in plan.items()}  # [k, P, b]
            rows = sharding.shard_members(rows, self.mesh, axis=1, batch=True)
            return self._scan, (state, shared, member, rows)
        on_device = sharding.shard_members(plan, self.mesh, batch=True, batch_axis=2)
        return self._one, (state, shared, member, on_device, np.int32(0))

    def scans(self, members: int) -> bool | None:
        """Whether a wave of `members` runs scanned chunks (None: not decided yet; the last
        decision for that many members, where several data shapes ran)."""
        if self.use_scan is not None:
            return self.use_scan
        found = [v for (width, _), v in self._scans.items() if width == members]
        return found[-1] if found else None

    def _program(self, state, shared, member, plan: Plan):
        """`(compiled, scanned, args, compile seconds)` of the program that runs `plan`: the
        scan over the chunk, or the loop step (with its first row index); compiled ahead of
        time once per signature, and kept. Undecided (CPU), one member on each of several
        devices: the scan is lowered first and kept unless it holds an XLA convolution."""
        width = jax.tree.leaves(state)[0].shape[0]
        decision = (width, _signature(None, (state, shared, member))[1:])
        scan = self.use_scan if self.use_scan is not None else self._scans.get(decision)
        rows = sharding.member_devices(self.mesh)
        if scan is None and (width > rows or rows == 1):
            scan = self._scans[decision] = False  # see `default_use_scan`
        fn, args = self._args(scan is not False, state, shared, member, plan)
        key = _signature(fn, args)
        if key not in self._aot:
            t = time.perf_counter()
            lowered = fn.lower(*args)
            if scan is None:
                scan = self._scans[decision] = "convolution" not in lowered.as_text()
                if not scan:
                    fn, args = self._args(False, state, shared, member, plan)
                    key = _signature(fn, args)
                    lowered = None if key in self._aot else fn.lower(*args)
            lower_s = time.perf_counter() - t
        if key not in self._aot:
            self._aot[key], build_s = compile_shared(lowered, args, cost=True)
            # What the program costs to compile, also where an identical one was compiled
            # before or it was loaded from the persistent cache (`place` weighs it against
            # what another layout could save).
            self.compile_seconds[key] = lower_s + build_s
        return self._aot[key], fn is self._scan, args, self.compile_seconds[key]

    def compile(self, state, shared, member, plan: Plan) -> float:
        """Compiles (ahead of time, once per signature) the program that runs `plan` on this
        state, without running it; returns its compile seconds (0 when it was compiled)."""
        key_count = len(self._aot)
        _, _, _, seconds = self._program(state, shared, member, plan)
        return seconds if len(self._aot) > key_count else 0.0

    def memory_per_member(self, state, shared, member, plan: Plan) -> float:
        """Device bytes one member of this population needs, from the compiled program's
        memory analysis (arguments + outputs + temporaries - donated aliases)."""
        compiled, _, args, _ = self._program(state, shared, member, plan)
        m = compiled.memory_analysis()
        if m is None:  # a backend without the analysis: count the arguments only
            total = sum(x.nbytes for x in jax.tree.leaves(args) if hasattr(x, "nbytes"))
        else:
            total = (
                m.argument_size_in_bytes
                + m.output_size_in_bytes
                + m.temp_size_in_bytes
                - m.alias_size_in_bytes
            )
        return total / jax.tree.leaves(state)[0].shape[0]

    def step_seconds(
        self, state, shared, member, plan: Plan, steps: int = 3
    ) -> tuple[float | None, float]:
        """`(seconds, compile seconds)`: the median wall seconds of one step of this
        population, timed over `steps` steps after one untimed (a scanned chunk: the second
        of two calls, over its steps; None on accelerators, where timing would wait for a
        whole chunk), and the seconds its program took to compile. The state is donated:
        pass a throwaway one."""
        fn, scanned, args, compile_s = self._program(state, shared, member, plan)
        if scanned:
            if jax.default_backend() != "cpu":
                return None, compile_s
            state, shared, member, rows = args
            for _ in range(2):
                t = time.perf_counter()
                state, _ = fn(state, shared, member, rows)
                jax.block_until_ready(state)
            return (time.perf_counter() - t) / next(iter(plan.values())).shape[1], compile_s
        state, shared, member, on_device, _ = args
        rows = next(iter(plan.values())).shape[1]
        times = []
        for j in range(steps + 1):
            t = time.perf_counter()
            state, _ = fn(state, shared, member, on_device, np.int32(j % rows))
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t)
        return float(np.median(times[1:])), compile_s

    def __call__(self, state, shared, member, plan: Plan):
        fn, scanned, args, _ = self._program(state, shared, member, plan)
        if scanned:
            state, metrics = fn(*args)
            return state, sharding.fetch(metrics)
        _, _, _, on_device, _ = args
        # Rows where some member has a real example; the others are skipped (computed once,
        # not per step on the host).
        masks = [
            np.asarray(v).reshape(v.shape[0], v.shape[1], -1)
            for k, v in plan.items()
            if "mask" in k
        ]
        live = np.flatnonzero(np.any([m.any(axis=(0, 2)) for m in masks], axis=0))
        out = []
        for j in live:
            state, metrics = fn(state, shared, member, on_device, np.int32(j))
            if self.sync:
                jax.block_until_ready(state)
            out.append(metrics)
        # Stacked on the host: an eager device stack would compile once per row count.
        out = sharding.fetch(out)
        if not out:
            empty = np.zeros((0, next(iter(plan.values())).shape[0]))
            return state, {"active": empty > 0, "finite": empty > 0, "state_finite": empty > 0}
        return state, {k: np.stack([m[k] for m in out]) for k in out[0]}


# Executables by what they compute: the text of the lowered program (its shapes, shardings,
# donations and constants included) with its argument and result trees. Phases whose programs
# compute the same thing (the state init of every SGD method, say) share one executable in
# the process: compiled once, not loaded again from the persistent cache for each phase.
_SHARED: collections.OrderedDict = collections.OrderedDict()
_SHARED_LOCK = threading.Lock()
SHARED_EXECUTABLES = 256  # kept, least recently used dropped first


# The primitives `host_eval` evaluates in numpy: what a state's init is made of (zeros,
# copies, casts, shapes), each exact in numpy as in XLA.
_HOST_PRIMITIVES: dict[str, Callable] = {
    "broadcast_in_dim": lambda x, *, shape, broadcast_dimensions, **_: np.broadcast_to(
        np.expand_dims(x, [d for d in range(len(shape)) if d not in broadcast_dimensions]),
        shape,
    ).copy(),
    "convert_element_type": lambda x, *, new_dtype, **_: np.asarray(x).astype(new_dtype),
    "copy": lambda x, **_: np.array(x),
    "copy_p": lambda x, **_: np.array(x),
    "reshape": lambda x, *, new_sizes, dimensions=None, **_: np.reshape(x, new_sizes),
    "squeeze": lambda x, *, dimensions, **_: np.squeeze(x, tuple(dimensions)),
    "expand_dims": lambda x, *, dimensions, **_: np.expand_dims(x, tuple(dimensions)),
    "concatenate": lambda *xs, dimension, **_: np.concatenate(xs, axis=dimension),
    "transpose": lambda x, *, permutation, **_: np.transpose(x, permutation),
}


class _NotOnHost(Exception):
    pass


def host_eval(fn: Callable, *args) -> PyTree | None:
    """`fn(*args)` evaluated in numpy from its jaxpr where every operation in it is one of
    `_HOST_PRIMITIVES` (nested jit calls included); None otherwise (then compile it). The
    same values as the compiled program: these operations move and cast values, and a cast
    rounds the same in numpy as in XLA."""
    try:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    except Exception:  # noqa: BLE001 - whatever cannot be traced here is compiled as before
        return None
    try:
        leaves = [np.asarray(x) for x in jax.tree.leaves(args)]
        out = _eval_jaxpr(closed.jaxpr, closed.consts, leaves)
    except _NotOnHost as e:
        if os.environ.get("CAMU_DEBUG_HOST_EVAL"):
            print(f"host_eval: {e} not on host")
        return None
    out = [
        np.asarray(x, dtype=s.dtype).reshape(s.shape)
        for x, s in zip(out, jax.tree.leaves(out_shape), strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)


def _eval_jaxpr(jaxpr, consts, args) -> list:
    env = {}

    def read(v):
        return v.val if isinstance(v, jax_core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = np.asarray(x)
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ins = [read(v) for v in eqn.invars]
        if name in ("pjit", "jit", "closed_call", "core_call"):
            inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
            inner_jaxpr = getattr(inner, "jaxpr", inner)
            outs = _eval_jaxpr(inner_jaxpr, getattr(inner, "consts", ()), ins)
        elif name in _HOST_PRIMITIVES:
            outs = _HOST_PRIMITIVES[name](*ins, **eqn.params)
            outs = [outs]
        else:
            raise _NotOnHost(name)
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


# XLA:CPU options of every program the engine builds. The legacy elemental emitters instead of
# the (default) fusion emitters: 25 % less compiling for the same run speed, measured on the
# digits jobs (`--methods camu,ft,scrub,ssd,unsir`: 14.4-15.4 s of compiling -> 11.1-11.6 s;
# phases' run seconds 4.3-4.5 s either way) and on MNIST (`--methods camu,ft,scrub`: 9.5-11.6 ->
# 8.2 s; run 246-252 s either way); docs/benchmarks.md. The two emitters round some fused
# elementwise results differently in their last bits. Unknown to an XLA without the option,
# it is dropped there (with a warning, once).
CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False}
_OPTIONS_REFUSED: list[str] = []


def _platform(args: Any) -> str:
    """The platform of the devices `args` (a program's arguments) are on."""
    leaves = [x for x in jax.tree.leaves(args) if isinstance(x, jax.Array)]
    return next(iter(leaves[0].sharding.device_set)).platform if leaves else jax.default_backend()


def _compile(lowered, args: Any):
    """`lowered.compile()`, with `CPU_COMPILER_OPTIONS` for a program of CPU devices."""
    platform = _platform(args)
    if platform != "cpu" or not CPU_COMPILER_OPTIONS or _OPTIONS_REFUSED:
        return lowered.compile()
    try:
        return lowered.compile(compiler_options=dict(CPU_COMPILER_OPTIONS))
    except jax.errors.JaxRuntimeError as e:
        if "No such compile option" not in str(e):
            raise
        _OPTIONS_REFUSED.append(str(e))
        warnings.warn(
            f"this XLA does not know the compile options {CPU_COMPILER_OPTIONS} ({e}); "
            "compiling without them",
            stacklevel=3,
        )
        return lowered.compile()


# What each program cost XLA to compile, kept beside JAX's persistent compilation cache (in
# `jax_compilation_cache_dir`, when one is set) so that a run which loads a program from that
# cache in a fraction of a second still knows what compiling it, or a program like it, costs:
# `place` weighs other layouts (compiled anew, most likely) against it. By program fingerprint
# (the sha256 of its lowered text, its donations, options and platform).
COMPILE_COSTS_FILE = "camu_compile_seconds.json"
_COSTS: dict[str, float] = {}
_COSTS_LOCK = threading.Lock()


def _costs_path() -> str | None:
    directory = jax.config.jax_compilation_cache_dir
    return os.path.join(directory, COMPILE_COSTS_FILE) if directory else None


def _read_costs(path: str) -> dict[str, float]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: only a lost estimate
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        k: float(v)
        for k, v in data.items()
        if isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
    }


def recorded_compile_seconds(fingerprint: str) -> float | None:
    """The seconds XLA took to compile the program `fingerprint` when it was last compiled
    (in this process, or by any run that shared its persistent compilation cache); None when
    unknown."""
    with _COSTS_LOCK:
        if fingerprint not in _COSTS:
            path = _costs_path()
            if path is not None:
                _COSTS.update({**_read_costs(path), **_COSTS})
        return _COSTS.get(fingerprint)


def _record_compile_seconds(fingerprint: str, seconds: float) -> None:
    """Keeps `seconds` for `fingerprint`, in memory and (merged with what other runs wrote,
    written whole through a temporary file) in the persistent cache's directory."""
    with _COSTS_LOCK:
        _COSTS[fingerprint] = seconds
        path = _costs_path()
        if path is None:
            return
        try:
            merged = {**_read_costs(path), fingerprint: seconds}
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w") as f:
                json.dump(merged, f)
            os.replace(tmp, path)
        except OSError:  # a read-only cache: the estimate lives in this process only
            pass


def compile_shared(lowered, args: Any, *, cost: bool = False) -> Any:
    """`lowered.compile()`, or the executable of an identical program compiled before in this
    process: same lowered text, same result tree, and arguments `args` (those `lowered` was
    lowered for) of the same tree, shapes, dtypes, shardings and donations. (The arguments
    count whole: a program leaves out of its text the arguments it does not read, yet its
    executable checks all of them.) With `cost`, `(executable, seconds)`: what compiling it
    with XLA costs (what a program like it costs, for `place`): the seconds its compilation
    took, also where it was loaded from the persistent compilation cache since (its recorded
    seconds, `recorded_compile_seconds`; the load's own where none was recorded)."""
    text = lowered.as_text()
    donated = tuple(a.donated for a in jax.tree.leaves(lowered.args_info))
    digest = hashlib.sha256(text.encode()).hexdigest()
    key = (digest, lowered.out_tree, donated, _signature(None, args)[1:])
    with _SHARED_LOCK:
        if key in _SHARED:
            _SHARED.move_to_end(key)
            compiled, seconds = _SHARED[key]
            return (compiled, seconds) if cost else compiled
    fingerprint = hashlib.sha256(
        repr((digest, donated, _platform(args), sorted(CPU_COMPILER_OPTIONS.items()))).encode()
    ).hexdigest()
    compile_seconds()  # JAX's compile events tell compiled from loaded (`_listener`)
    _thread.built = None
    t = time.perf_counter()
    compiled = _compile(lowered, args)
    seconds = time.perf_counter() - t
    if _thread.built == "compiled":
        _record_compile_seconds(fingerprint, seconds)
    elif _thread.built == "loaded":
        seconds = recorded_compile_seconds(fingerprint) or seconds
    with _SHARED_LOCK:
        _SHARED[key] = (compiled, seconds)
        while len(_SHARED) > SHARED_EXECUTABLES:
            _SHARED.popitem(last=False)
    return (compiled, seconds) if cost else compiled


def _signature(fn, args) -> tuple:
    leaves, tree = jax.tree.flatten(args)
    return (
        id(fn),
        tree,
        tuple((np.shape(x), str(x.dtype), getattr(x, "sharding", None)) for x in leaves),
    )


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where and how a phase's `count` members run: on `mesh` (a sub-mesh of the study's:
    its first member rows), in waves of `size` members (a multiple of the mesh's member
    devices; the last wave padded with inactive copies), chosen by `rule`; `probe` holds the
    measured member-steps per second of the candidates when a timed probe decided."""

    mesh: Mesh
    size: int
    count: int
    rule: str
    probe: dict | None = None

    @property
    def waves(self) -> int:
        return -(-self.count // self.size)

    @property
    def padding(self) -> int:
        """Padding members over all waves (inactive copies that fill a wave's devices)."""
        return self.waves * self.size - self.count

    def record(self, what: str = "") -> dict:
        """The JSON record of the choice (results.json's `phases[i]["placement"]`)."""
        rows = sharding.member_devices(self.mesh)
        out = {
            "what": what,
            "members": self.count,
            "devices": int(self.mesh.devices.size),
            "member_devices": rows,
            "data_devices": sharding.data_devices(self.mesh),
            "members_per_device": self.size // rows,
            "wave_size": self.size,
            "waves": self.waves,
            "padding_members": self.padding,
            "rule": self.rule,
        }
        if self.probe is not None:
            out["probe_member_steps_per_s"] = self.probe
        return out

    def describe(self, what: str = "") -> str:
        rows, data = sharding.member_devices(self.mesh), sharding.data_devices(self.mesh)
        where = f"{rows} device{'s' * (rows > 1)}" + (f" x {data} (batch split)" * (data > 1))
        waves = f"{self.waves} wave{'s' * (self.waves > 1)} of {self.size}"
        pad = f", {self.padding} padding" if self.padding else ""
        return (
            f"placement{' of ' + what if what else ''}: {self.count} member"
            f"{'s' * (self.count != 1)} on {where}, {waves} ({self.size // rows} per device"
            f"{pad}); {self.rule}"
        )


# Every placement chosen in this process, in order (`Timer.placements`: those of a phase).
_placements: list[dict] = []

# Probe returns `(bytes per member, seconds per step or None, compile seconds, wave seconds)`
# of a wave of `size` members on `mesh`; seconds per step only when `timed` and the engine can
# time a step (on CPU), compile seconds what its program costs to compile, wave
# seconds what building the wave's member data took (a wave's fixed cost, compiling apart).
Probe = Callable[[Mesh, int, bool], tuple[float, float | None, float, float]]


def submesh(mesh: Mesh, member_rows: int) -> Mesh:
    """The first `member_rows` rows of `mesh`'s member axis (each row keeps its data devices)."""
    if member_rows == sharding.member_devices(mesh):
        return mesh
    return Mesh(np.asarray(mesh.devices)[:member_rows], mesh.axis_names)


def place(
    requested: int | None,
    count: int,
    mesh: Mesh,
    probe: Probe | None = None,
    *,
    steps: int | None = None,
    log=print,
    what: str = "",
    record: bool = True,
    ahead: bool = False,
) -> Placement:
    """The placement of a phase of `count` members on `mesh` (printed, and recorded for
    `Timer.placements`).

    * Never more member devices than members: a phase of fewer members than the mesh has
      member rows runs on a sub-mesh of one row per member, with no padding members (a padded
      member costs a real member's work: on a CPU it takes a core from the real one). Across
      processes (`jax.distributed`) every row stays in, so that every process takes part.
    * `requested` (`--population-size`) members per wave, rounded up to the member devices.
    * Where `probe` can time the compiled step (a CPU, in one process),
      the layouts are weighed by what they cost, compiling included, so that a phase is never
      slower than its members one at a time: `_timed_choice`. With `ahead` (compiling a
      phase's programs ahead, `runner.compile_ahead`, where nothing can be timed), the
      layout such a phase times first: one member at a time on one device.
    * Otherwise every member in one wave, or as many as fit in the devices' free memory (from
      `probe`'s memory analysis of the compiled step).
    """
    if count < 1:
        raise ValueError(f"a phase needs at least one member, got {count}")
    if requested is not None and requested < 1:
        raise ValueError(f"population size must be positive, got {requested}")
    rows_all = sharding.member_devices(mesh)
    if jax.process_count() > 1:
        rows = rows_all
    else:
        rows = max(1, min(rows_all, count, requested or count))
    sub = submesh(mesh, rows)
    rates = None
    timed = (
        probe is not None
        and count > 1
        and bool(steps)
        and jax.process_count() == 1
        and not default_use_scan()
    )
    if requested is not None:
        size = -(-min(requested, count) // rows) * rows
        rule = f"population size {requested} requested"
    elif probe is None:
        size = -(-count // rows) * rows
        rule = "every member in one wave"
        if count <= rows:
            rule = "one member per device" if rows == count else "every device takes part"
    else:
        full = -(-count // rows) * rows
        size, rule = rows, "one member per device" if rows == count else "every device takes part"
        chosen = (
            _timed_choice(mesh, sub, rows, full, count, steps, probe, ahead=ahead)
            if timed
            else None
        )
        if chosen is not None:
            sub, size, rule, rates = chosen
        elif full > rows:
            need, *_ = probe(sub, full, False)
            size = _fit(sub, rows, full, need)
            rule = (
                f"every member in one wave ({need / 2**20:.1f} MiB each)"
                if size == full
                else f"as many as fit in {sharding.free_memory(sub) / 2**30:.1f} GiB free per "
                f"device ({need / 2**20:.1f} MiB each)"
            )
    out = Placement(sub, size, count, rule, rates)
    if record:  # not when compiling ahead (`runner.compile_ahead`)
        _placements.append(out.record(what))
    if log is not None:
        log(out.describe(what))
    return out


def _fit(sub: Mesh, rows: int, full: int, need: float) -> int:
    """Members per wave: all `full`, or as many as fit in 80 % of the devices' free memory at
    `need` bytes each (a multiple of the `rows` member devices, at least `rows`)."""
    fit = int(0.8 * sharding.free_memory(sub) * rows // max(need, 1.0))
    return max(rows, min(full, fit // rows * rows))


# A layout over several devices, or with several members to a device, is a program that costs
# XLA more to compile than one member's on one device: 2.0-2.3x for the digits CNN's training
# (0.89-0.90 s for one member on one device; 2.04 s for one per device, 1.85 s for five per
# device), 0.9-1.1x for CaMU's two programs (3.5 s; 3.1 s; 3.9 s), on 2 CPU devices (JAX's
# compile log of `python -m experiments.unlearn --forget-class all --seeds 0 --no-relearn
# --population-size 1|2|10`, 2026-12-07). `place` prices a layout it has not compiled at this
# multiple of the one-member program's cost, the dearest measured, so a layout is tried only
# where it could repay even that.
OTHER_LAYOUT_COMPILE_RATIO = 2.3


def _timed_choice(
    mesh: Mesh,
    sub: Mesh,
    rows: int,
    full: int,
    count: int,
    steps: int,
    probe: Probe,
    *,
    ahead: bool = False,
):
    """`(mesh, size, rule, rates)`: the layout that runs a phase of `count` members and
    `steps` member-steps fastest, compiling included, among: one member at a time on one
    device (`A`, the layout of `--population-size 1`), one member per device over `rows`
    devices (`B`) and as many members stacked over them as fit in memory, at most `full`
    (`C`); None where the probe cannot time (then the caller's choice). The memory a member
    needs comes from A's program: no program is compiled only to read its memory analysis.
    With `ahead`, A, untimed (compiled ahead; the phase times it).

    A layout's time is its waves' fixed cost (building each wave's member data: the
    teachers' forward passes, counterfactuals, tables) plus its steps: `waves x w + steps x
    t / members per wave`. A is timed first: it is the fallback, and often compiled already
    (an earlier phase's program). Another layout is compiled and timed only where it could
    pay back its compilation even at its best: B with all devices busy and A's cost per wave,
    C with free steps in one wave; either against what A's program cost XLA to compile (its
    recorded seconds where it was loaded from the persistent cache) times
    `OTHER_LAYOUT_COMPILE_RATIO`. So a warm run tries the layouts its cold run tried (found
    in the cache then), and no others. Of the layouts timed, the fastest runs (their
    compilation is spent by then). So a phase too short to repay a compile runs exactly as
    one at a time, and a longer one the layout measured fastest. (Digits on two CPU devices:
    20 CaMU runs, about 6 s of steps and 0.2 s to build each run's counterfactual
    embeddings, could save at most 5.9 s against 2.3 x 4.9 s of compiling: one at a time.)
    """
    one = submesh(mesh, 1)
    need, t1, c1, w1 = probe(one, 1, not ahead)
    if ahead:
        return one, 1, "compiled ahead: one at a time on one device, the layout timed first", None
    if t1 is None:
        return None
    size = _fit(sub, rows, full, need)

    def cost(t, w, per_wave):
        return -(-count // per_wave) * w + steps * t / per_wave

    timed = {"one_device": (one, 1, t1, cost(t1, w1, 1))}
    best = timed["one_device"][3]
    skipped = []
    other = c1 * OTHER_LAYOUT_COMPILE_RATIO  # what compiling another layout may cost
    if rows > 1:
        saved = best - cost(t1, w1, rows)  # all devices busy, A's wave cost
        if saved > other:
            _, tn, _, wn = probe(sub, rows, True)
            timed["1_per_device"] = (sub, rows, tn, cost(tn, wn, rows))
            best = min(best, timed["1_per_device"][3])
        else:
            skipped.append(f"one per device could save at most {saved:.1f} s")
    if size > rows:
        saved = best - w1 * -(-count // size)  # free steps, A's wave cost
        if saved > other:
            _, ts, _, ws = probe(sub, size, True)
            timed[f"{size // rows}_per_device"] = (sub, size, ts, cost(ts, ws, size))
        else:
            skipped.append(f"stacking at most {saved:.1f} s")
    names = list(timed)
    # [seconds of the phase, member-steps per second] of each, as process 0 measured them
    measured = sharding.from_process_zero(
        np.asarray([[timed[n][3], timed[n][1] / timed[n][2]] for n in names], np.float64)
    )
    rates = {n: round(float(r), 1) for n, r in zip(names, measured[:, 1], strict=True)}
    pick = names[int(np.argmin(measured[:, 0]))]
    chosen_mesh, chosen_size, _, _ = timed[pick]
    where = {
        "one_device": "one at a time on one device",
        "1_per_device": "one member per device",
    }.get(pick, f"stacked, {chosen_size // rows} per device")
    estimate = ", ".join(
        f"{n.replace('_', ' ')} {s:.1f} s ({rates[n]:.0f} member-steps/s)"
        for n, s in zip(names, measured[:, 0], strict=True)
    )
    rule = f"timed probe: {where}; the phase's estimate {estimate}"
    if skipped:
        rule += (
            f"; not tried, as compiling another layout may cost {other:.1f} s ({c1:.1f} s "
            "one at a time): " + ", ".join(skipped)
        )
    return chosen_mesh, chosen_size, rule, rates


# ------------------------------------------------------------------------------ host side


def pad_steps(plan: Plan, multiple: int) -> Plan:
    """Pads `[members, steps, batch]` plans with all-zero (inactive) steps to a multiple of
    `multiple` steps."""
    steps = next(iter(plan.values())).shape[1]
    extra = -steps % multiple
    return {
        k: np.concatenate([v, np.zeros((v.shape[0], extra, *v.shape[2:]), v.dtype)], axis=1)
        for k, v in plan.items()
    }


def stack_plans(plans: Sequence[Plan]) -> Plan:
    """Per-member `[steps_i, batch]` plans -> one `[members, max steps, batch]` plan; a
    shorter member is padded with inactive steps at its end."""
    steps = max(next(iter(p.values())).shape[0] for p in plans)
    out = {}
    for key in plans[0]:
        parts = []
        for p in plans:
            v = p[key]
            pad = np.zeros((steps - v.shape[0], *v.shape[1:]), v.dtype)
            parts.append(np.concatenate([v, pad]))
        out[key] = np.stack(parts)
    return out


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Host or device trees of identical structure -> one tree with a leading member axis."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def unstack(tree: PyTree, count: int) -> list[PyTree]:
    """The first `count` members of a stacked tree, as host trees."""
    host = sharding.fetch(tree)
    return [jax.tree.map(lambda x, i=i: x[i], host) for i in range(count)]


def check_finite(metrics: dict, names: Sequence[str], where: str, state=None) -> None:
    """Raises FloatingPointError naming the member, phase and step of the first non-finite loss
    or state (host arrays `[k, members]` / `[members]`); with the wave's `state`, the message
    names the first non-finite leaf.

    The last step of a chunk can turn the parameters non-finite while its loss, computed before
    the update, is still finite; the state check keeps such a state from being saved."""
    bad = nonfinite_members(metrics, names, where, state)
    if bad:
        raise FloatingPointError(bad[min(bad)])


def nonfinite_members(
    metrics: dict, names: Sequence[str], where: str, state=None, skip=()
) -> dict[int, str]:
    """`{member: message}` for every member (outside `skip`) whose losses or state in a chunk's
    host metrics are not finite: what `check_finite` raises, for callers that record a
    diverged member and let the others go on."""
    finite = np.asarray(metrics["finite"], bool)
    state_finite = np.asarray(metrics["state_finite"], bool)
    out = {}
    for m, name in enumerate(names):
        if m in skip:
            continue
        if finite.size and not finite[:, m].all():
            step = int(np.argmin(finite[:, m]))
            values = {
                k: float(np.asarray(v)[step, m])
                for k, v in metrics.items()
                if k not in ("finite", "active", "state_finite")
            }
            out[m] = (
                f"non-finite loss {values} at {where} ({name}), step {step} of the chunk; "
                "stopping before anything of this epoch is saved (lower the learning rate or "
                "check the inputs)"
            )
        elif state_finite.size and not state_finite[:, m].all():
            leaf = "" if state is None else _first_nonfinite(state, m)
            out[m] = (
                f"non-finite parameters at {where}: {name}{leaf}; stopping before anything of "
                "this epoch is saved (lower the learning rate or check the inputs)"
            )
    return out


def _first_nonfinite(state, member: int) -> str:
    host = sharding.fetch(state)
    for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]:
        leaf = np.asarray(leaf)[member]
        if np.issubdtype(leaf.dtype, np.floating) and not np.isfinite(leaf).all():
            name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            return (
                f": {name} has {int((~np.isfinite(leaf)).sum())} of {leaf.size} entries NaN or inf"
            )
    return ""


def chunk_means(metrics: dict, keys: Sequence[str], member: int) -> dict[str, float]:
    """Means of `keys` over the active steps of one member in a chunk's host metrics."""
    active = np.asarray(metrics["active"], bool)[:, member]
    if not active.any():
        return {}
    return {k: float(np.mean(np.asarray(metrics[k])[active, member])) for k in keys}


def waves(count: int, size: int) -> list[list[int]]:
    """Member indices in waves of at most `size`."""
    return [list(range(lo, min(lo + size, count))) for lo in range(0, count, size)]


def pad_members(items: list, size: int) -> list:
    """Pads a wave's per-member list to `size` entries by repeating its first member, so every
    wave has one shape (one compile); padded members get all-inactive plans."""
    return items + [items[0]] * (size - len(items))


class Timer:
    """Wall seconds of a phase, and what JAX compiled inside it: the compile seconds, the
    programs XLA compiled and those loaded from the persistent compilation cache.

    A program is built once per process and shape (JAX keeps it in memory); building it either
    compiles it with XLA (what users wait for) or, when `jax_compilation_cache_dir` holds it,
    loads the compiled executable from that persistent cache (a fraction of the time).

    Compilations are counted per scope (`compile_scope`): a timer counts those of the scope
    of the thread that made it, so programs compiled ahead in another thread
    (`runner.compile_ahead`) are not counted in the phase that runs meanwhile."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.ledger = _ledger()
        self.compile0 = self.ledger.total
        self.programs0 = dict(self.ledger.programs)
        self.compiled0 = dict(self.ledger.compiled)
        self.loaded0 = dict(self.ledger.loaded)
        self.backend0 = dict(self.ledger.backend)
        self.placements0 = len(_placements)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def compile_seconds(self) -> float:
        """Seconds spent tracing, lowering and building programs (compiling or loading them),
        as JAX's compile events report them."""
        return self.ledger.total - self.compile0

    @property
    def placements(self) -> list[dict]:
        """The placements (`place`) chosen since the timer started."""
        return _placements[self.placements0 :]

    @property
    def programs(self) -> dict[str, int]:
        """`{program name: programs built}` since the timer started: compiled by XLA or loaded
        from the persistent compilation cache (kept for compatibility: the sum of
        `compiled_programs` and `loaded_programs`)."""
        return _since(self.ledger.programs, self.programs0)

    @property
    def compiled_programs(self) -> dict[str, int]:
        """`{program name: XLA compilations}` since the timer started (cache loads apart)."""
        return _since(self.ledger.compiled, self.compiled0)

    @property
    def loaded_programs(self) -> dict[str, int]:
        """`{program name: loads from the persistent compilation cache}` since the timer
        started."""
        return _since(self.ledger.loaded, self.loaded0)

    @property
    def xla_compile_seconds(self) -> float:
        """Seconds of the XLA compilations since the timer started (JAX's backend-compile
        events of the programs not found in the persistent cache, cache look-up included)."""
        return self.ledger.backend["compiled"] - self.backend0["compiled"]

    @property
    def cache_load_seconds(self) -> float:
        """Seconds of the persistent-cache loads since the timer started (JAX's backend-compile
        events of the programs found in the cache: key, read, deserialisation)."""
        return self.ledger.backend["loaded"] - self.backend0["loaded"]

    def compile_record(self) -> dict:
        """The compile fields of results.json's phase records (`programs_compiled`: XLA
        compilations, what users wait for; `programs_loaded`: persistent-cache loads;
        `compile_seconds` includes tracing and lowering, `xla_compile_seconds` and
        `cache_load_seconds` are the backend part of each kind; `programs`: per name)."""
        compiled, loaded = self.compiled_programs, self.loaded_programs
        return {
            "compile_seconds": self.compile_seconds,
            "xla_compile_seconds": self.xla_compile_seconds,
            "cache_load_seconds": self.cache_load_seconds,
            "programs_compiled": sum(compiled.values()),
            "programs_loaded": sum(loaded.values()),
            "programs": {"compiled": compiled, "loaded": loaded},
        }


def sum_compile_records(records: Sequence[dict]) -> dict:
    """`Timer.compile_record`s of several timers (a phase timed in pieces) added up."""
    out = {
        "compile_seconds": 0.0,
        "xla_compile_seconds": 0.0,
        "cache_load_seconds": 0.0,
        "programs_compiled": 0,
        "programs_loaded": 0,
        "programs": {"compiled": {}, "loaded": {}},
    }
    for r in records:
        for k in ("compile_seconds", "xla_compile_seconds", "cache_load_seconds"):
            out[k] += r[k]
        for k in ("programs_compiled", "programs_loaded"):
            out[k] += r[k]
        for kind, names in r["programs"].items():
            into = out["programs"][kind]
            for name, n in names.items():
                into[name] = into.get(name, 0) + n
    return out


def _since(counts: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in counts.items() if n > before.get(k, 0)}


# JAX's monitoring events (the same names in jax 0.10.2 to 0.12.x). Every program JAX builds
# emits one backend-compile duration (`fun_name`: the program), around
# `jax._src.compiler.compile_or_get_cached`; inside it, on the same thread, a persistent-cache
# hit emits the cache-hit event, and a miss compiles with XLA (the cache-miss event is only
# emitted when the entry is written, so it does not mark every miss). Events arrive on the
# thread that compiles, so each is booked to that thread's scope.
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class _Ledger:
    """What JAX compiled in one scope."""

    def __init__(self):
        self.total = 0.0
        self.programs: dict[str, int] = {}  # built: compiled or loaded
        self.compiled: dict[str, int] = {}  # compiled by XLA
        self.loaded: dict[str, int] = {}  # loaded from the persistent compilation cache
        self.backend = {"compiled": 0.0, "loaded": 0.0}


_ledgers: dict[str, _Ledger] = {}
# `scope`; `pending`: a cache hit not yet claimed by its program; `built`: how the last program
# was built ("compiled" or "loaded")
_thread = threading.local()
_listening = [False]


def _ledger(scope: str | None = None) -> _Ledger:
    compile_seconds()  # listening from the first timer on
    scope = getattr(_thread, "scope", "main") if scope is None else scope
    return _ledgers.setdefault(scope, _Ledger())


@contextlib.contextmanager
def compile_scope(name: str):
    """Books this thread's compilations to scope `name` (default scope: "main")."""
    before = getattr(_thread, "scope", "main")
    _thread.scope = name
    try:
        yield
    finally:
        _thread.scope = before


def _listener(event: str, duration: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS:
        ledger = _ledgers.setdefault(getattr(_thread, "scope", "main"), _Ledger())
        ledger.total += duration
        if event == _COMPILE_EVENTS[2]:
            name = str(kwargs.get("fun_name", "?"))
            ledger.programs[name] = ledger.programs.get(name, 0) + 1
            loaded = getattr(_thread, "pending", False)
            _thread.pending = False
            counts, kind = (ledger.loaded, "loaded") if loaded else (ledger.compiled, "compiled")
            counts[name] = counts.get(name, 0) + 1
            _thread.built = kind  # for `compile_shared`: compiled by XLA, or loaded
            ledger.backend[kind] += duration


def _event_listener(event: str, **kwargs) -> None:
    if event == _CACHE_HIT_EVENT:
        _thread.pending = True


def compile_seconds() -> float:
    """Seconds this thread's scope (`compile_scope`) has spent tracing, lowering and compiling
    (JAX's own compile events; a persistent-cache hit counts its retrieval only)."""
    if not _listening[0]:
        jax.monitoring.register_event_duration_secs_listener(_listener)
        jax.monitoring.register_event_listener(_event_listener)
        _listening[0] = True
    return _ledgers.setdefault(getattr(_thread, "scope", "main"), _Ledger()).total
