"""Run in its own process (float64): `python population_ssd_unrolling.py OUT.npz` prints JSON
and writes SSD's arrays to OUT.npz, for tests/test_methods_ssd_unrolling.py.

SSD and Unrolling SGD on digits (seeds 0, 1, 2 forgetting classes 0, 1, 2; originals trained
one epoch): every member run alone, all three together, and in waves of two. Also the same
quantities computed without the engine, from the methods' published definitions:
SSD's importances by the official `calc_importance` loop (squared gradient of each batch's mean
loss, eval mode, summed over batches and divided by their count), and Unrolling's update from
one gradient of the summed loss over all of D_f at the seed's initial weights. float64 makes
every comparison about the function computed, not float32 summation order.
"""

import os

os.environ["JAX_ENABLE_X64"] = "1"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from camu_jax import losses, sharding  # noqa: E402
from camu_jax.data import ForgetSpec, input_spec_for, load_dataset, make_splits  # noqa: E402
from camu_jax.data.pipeline import DeviceData, pad_to_batches, preprocess  # noqa: E402
from camu_jax.methods import run_population  # noqa: E402
from camu_jax.methods.ssd import SSDWithImportances  # noqa: E402
from camu_jax.methods.unrolling import UnrollingSGD  # noqa: E402
from camu_jax.models import apply_model, create_model, init_variables  # noqa: E402
from camu_jax.training import TrainConfig, train_population  # noqa: E402

SEEDS = (0, 1, 2)
CLASSES = (0, 1, 2)
SSD_CONFIG = SSDWithImportances(alpha=1.0, lam=0.5)
UNROLL_CONFIG = UnrollingSGD(learning_rate=0.04, original_epochs=1)


def f64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def vec(tree):
    """Every leaf, flattened and concatenated: the comparisons are elementwise."""
    return np.concatenate([x.ravel() for x in leaves(tree)])


def max_abs(a, b):
    return float(max(np.max(np.abs(x - y)) for x, y in zip(leaves(a), leaves(b), strict=True)))


def modes(method, model, originals, **kw):
    """`{mode: [variables per member]}`: alone, all together, waves of two."""
    out = {"sequential": []}
    for i in range(len(SEEDS)):
        sub = {k: [v[i]] for k, v in kw.items() if k in ("splits", "seeds")}
        rest = {k: v for k, v in kw.items() if k not in ("splits", "seeds")}
        out["sequential"] += [
            v for v, _ in run_population(method, model, [originals[i]], **sub, **rest)
        ]
    out["population"] = [v for v, _ in run_population(method, model, originals, **kw)]
    out["two_waves"] = [
        v for v, _ in run_population(method, model, originals, population_size=2, **kw)
    ]
    return out


def reference_importances(model, variables, data, rows_f, rows_r, batch_size):
    """The official `calc_importance` over D_f, and over D as D_r's batches then D_f's, with
    both in class order (`build_retain_forget_sets`)."""

    @jax.jit
    def squared(params, x, y, mask):
        def loss(p):
            logits, _, _ = apply_model(
                model, p, variables["batch_stats"], x, train=False, mask=mask
            )
            return losses.cross_entropy_mean(logits=logits, labels=y, weights=mask)

        return jax.tree.map(jnp.square, jax.grad(loss)(params))

    def sums(rows):
        rows = rows[np.argsort(data.host_labels[rows], kind="stable")]
        ids, mask = pad_to_batches(np.arange(rows.size), batch_size)
        total = None
        for i, m in zip(ids, mask, strict=True):
            x = preprocess(data.images[rows[i]], data.spec)
            sq = squared(variables["params"], x, data.labels[rows[i]], jnp.asarray(m, x.dtype))
            total = sq if total is None else jax.tree.map(jnp.add, total, sq)
        return total, len(ids)

    s_f, n_f = sums(rows_f)
    s_r, n_r = sums(rows_r)
    i_f = jax.tree.map(lambda s: s / n_f, s_f)
    i_d = jax.tree.map(lambda r, f: (r + f) / (n_r + n_f), s_r, s_f)
    return i_f, i_d


def main():
    assert jax.config.jax_enable_x64
    d = load_dataset("digits", progress=False)
    spec = input_spec_for("digits", "cnn")
    model = create_model("cnn", num_classes=10)
    data = DeviceData.put(d.train_images, d.train_labels, spec=spec, mesh=sharding.make_mesh())
    inits = [f64(init_variables(model, jax.random.key(s), data.input_shape)) for s in SEEDS]
    originals = [
        f64(v)
        for v, _ in train_population(
            model,
            inits,
            data=data,
            items=[np.arange(d.train_labels.size)] * len(SEEDS),
            seeds=SEEDS,
            config=TrainConfig(epochs=1),
            progress=False,
        )
    ]
    splits = [
        make_splits(d.train_labels, ForgetSpec(kind="class", classes=(c,)), seed=s, num_classes=10)
        for s, c in zip(SEEDS, CLASSES, strict=True)
    ]
    kw = dict(data=data, splits=splits, seeds=list(SEEDS), num_classes=10, progress=False)
    out = {
        "forget_sizes": [int(s.forget.size) for s in splits],
        "remain_sizes": [int(s.remain.size) for s in splits],
    }

    ssd = modes(SSD_CONFIG, model, originals, **kw)
    seq = ssd["sequential"]
    arrays = {}
    for i, o in enumerate(originals):
        arrays[f"original_{i}"] = vec(o["params"])
        for mode, runs in ssd.items():
            for key in ("params", "i_f", "i_d"):
                arrays[f"{mode}_{key}_{i}"] = vec(runs[i][key])
    np.savez(sys.argv[1], **arrays)
    out["ssd"] = {"alpha": SSD_CONFIG.alpha, "lam": SSD_CONFIG.lam, "modes": list(ssd)}
    ref_f, ref_d = reference_importances(
        model, originals[0], data, splits[0].forget, splits[0].remain, SSD_CONFIG.batch_size
    )
    out["ssd"]["reference"] = {
        "i_f": max_abs(ref_f, seq[0]["i_f"]),
        "i_d": max_abs(ref_d, seq[0]["i_d"]),
    }

    unroll = modes(UNROLL_CONFIG, model, originals, **kw)
    useq = unroll["sequential"]
    out["unrolling"] = {
        "steps": [-(-s.forget.size // UNROLL_CONFIG.batch_size) for s in splits],
        "scale": UNROLL_CONFIG.scale,
        "modes": {
            mode: [max_abs(v["params"], s["params"]) for v, s in zip(runs, useq, strict=True)]
            for mode, runs in unroll.items()
            if mode != "sequential"
        },
        "moved": [max_abs(s["params"], o["params"]) for s, o in zip(useq, originals, strict=True)],
        "param_scale": [
            float(max(np.max(np.abs(x)) for x in leaves(o["params"]))) for o in originals
        ],
    }
    # theta_T + eta * E / b * (one gradient of the summed loss over all of D_f at theta_0).
    formula = []
    for init, orig, sp, res in zip(inits, originals, splits, useq, strict=True):
        x = preprocess(data.images[sp.forget], data.spec)
        y = data.labels[sp.forget]

        def summed(p, init=init, x=x, y=y):
            logits, _, _ = apply_model(model, p, init["batch_stats"], x, train=True)
            return losses.cross_entropy_mean(logits=logits, labels=y) * y.shape[0]

        grads = jax.grad(summed)(init["params"])
        expected = jax.tree.map(lambda t, g: t + UNROLL_CONFIG.scale * g, orig["params"], grads)
        formula.append(max_abs(expected, res["params"]))
    out["unrolling"]["formula"] = formula
    out["unrolling"]["forget_sizes"] = out["forget_sizes"]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
