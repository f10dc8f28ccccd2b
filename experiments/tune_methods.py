"""Tunes unlearning baselines for a dataset by the project's protocol (docs/methods.md).

10 % of D_r (seeded) is held out as a validation split V, never the test set. The original is
trained on D \\ V, the retrained model on D_r \\ V; every setting of a method's grid unlearns
the original with D_r \\ V as its remaining set, and the setting minimising
`|acc(D_f) - acc_retrain(D_f)| + |acc(V) - acc_retrain(V)|` is chosen (ties: fewer epochs,
then the smaller learning rate). Prints one JSON line per setting and writes them all to
`--out`.

    python -m experiments.tune_methods --methods ft ga --out docs/tuning/mnist_class0.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import pickle
import sys
from pathlib import Path

import jax
import numpy as np

from camu_jax import methods, sharding
from camu_jax.data import DeviceData, input_spec_for, load_dataset
from camu_jax.data.splits import Splits
from camu_jax.evaluation import predict
from camu_jax.models import create_model, init_variables
from camu_jax.training import TrainConfig, train_population

# Per method: fixed overrides and the grid (learning rates x epochs x extra axes). Centred on
# each official setting (the method's docstring), spanning about two decades of lr.
GRIDS = {
    "ft": {"learning_rate": [0.03, 0.1, 0.3], "epochs": [3, 10]},
    "ga": {"learning_rate": [1e-5, 1e-4, 1e-3, 1e-2], "epochs": [1, 3]},
    "neggrad_plus": {"learning_rate": [0.001, 0.01, 0.05], "epochs": [1, 3]},
    "rl": {"learning_rate": [0.001, 0.01, 0.05], "epochs": [1, 3]},
    "amnesiac": {"learning_rate": [1e-5, 1e-4, 1e-3], "epochs": [1, 3]},
    "l1_sparse": {"learning_rate": [0.01, 0.03], "epochs": [1, 3], "gamma": [1e-4, 5e-4]},
    "salun": {"learning_rate": [0.001, 0.01, 0.05], "epochs": [1, 3]},
}


def split_validation(splits: Splits, seed: int, fraction: float = 0.1) -> tuple[Splits, np.ndarray]:
    """(splits with D_r \\ V as the remaining and sample sets' source, V)."""
    rng = np.random.default_rng([seed, 10])
    remain = splits.remain
    val = np.sort(rng.choice(remain, size=int(round(fraction * remain.size)), replace=False))
    kept = np.setdiff1d(remain, val)
    sample = np.sort(rng.choice(kept, size=min(kept.size, splits.forget.size), replace=False))
    return Splits(forget=splits.forget, remain=kept, sample=sample, repeat=splits.repeat), val


def accuracy(model, variables, data, rows, labels) -> float:
    stacked = jax.tree.map(lambda x: np.asarray(x)[None], variables)
    logits = predict(model, stacked, data, np.asarray(rows)[None])[0]
    return float(100.0 * np.mean(logits.argmax(-1) == labels[rows]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(GRIDS))
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--forget-class", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--original-epochs", type=int, default=5)
    parser.add_argument("--cache", default="/tmp/camu_tune_cache")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--grid", default="{}", help='JSON replacing grids, e.g. {"ga": {"learning_rate": [0.003]}}'
    )
    args = parser.parse_args(argv)
    try:
        grids = {**GRIDS, **json.loads(args.grid)}
    except json.JSONDecodeError as e:
        print(f"error: --grid is not JSON ({e}): {args.grid!r}", file=sys.stderr)
        return 2
    unknown = [m for m in args.methods if m not in grids]
    if unknown:
        print(f"error: no grid for {unknown}; known: {', '.join(grids)}", file=sys.stderr)
        return 2

    d = load_dataset(args.dataset, progress=False)
    mesh = sharding.make_mesh()
    spec = input_spec_for(args.dataset, "cnn")
    train = DeviceData.put(d.train_images, d.train_labels, spec=spec, mesh=mesh)
    model = create_model("cnn", num_classes=d.num_classes)
    labels = np.asarray(d.train_labels)
    forget = np.flatnonzero(labels == args.forget_class)
    full = Splits(forget=forget, remain=np.setdiff1d(np.arange(labels.size), forget), sample=forget)
    splits, val = split_validation(full, args.seed)

    cache = (
        Path(args.cache)
        / f"{args.dataset}_c{args.forget_class}_s{args.seed}_e{args.original_epochs}.pkl"
    )
    if cache.exists():
        original, retrain = pickle.loads(cache.read_bytes())
    else:
        init = init_variables(model, jax.random.key(args.seed), train.input_shape)
        items = [np.sort(np.concatenate([splits.forget, splits.remain])), splits.remain]
        out = train_population(
            model,
            [init, init],
            data=train,
            items=items,
            seeds=[args.seed, args.seed],
            config=TrainConfig(epochs=args.original_epochs),
            progress=False,
        )
        original, retrain = (jax.tree.map(np.asarray, v) for v, _ in out)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps((original, retrain)))

    def scores(variables):
        return {
            "acc_forget": accuracy(model, variables, train, splits.forget, labels),
            "acc_val": accuracy(model, variables, train, val, labels),
        }

    reference = {"original": scores(original), "retrain": scores(retrain)}
    print(json.dumps({"reference": reference, "original_epochs": args.original_epochs}), flush=True)
    target = reference["retrain"]
    rows = []
    for name in args.methods:
        grid = grids[name]
        keys = list(grid)
        for values in itertools.product(*grid.values()):
            setting = dict(zip(keys, values, strict=True))
            method = methods.get(name, **setting)
            try:
                [(variables, info)] = methods.run_population(
                    method,
                    model,
                    [original],
                    data=train,
                    splits=[splits],
                    seeds=[args.seed],
                    num_classes=d.num_classes,
                    progress=False,
                )
            except FloatingPointError as e:  # a diverging setting is a result, not a crash
                row = {"method": name, **setting, "diverged": str(e)[:160], "score": float("inf")}
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            s = scores(variables)
            gap = abs(s["acc_forget"] - target["acc_forget"]) + abs(
                s["acc_val"] - target["acc_val"]
            )
            row = {"method": name, **setting, **s, "score": gap, "steps": info["steps"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    chosen = {}
    for name in args.methods:
        mine = [r for r in rows if r["method"] == name]
        best = min(mine, key=lambda r: (round(r["score"], 6), r["epochs"], r["learning_rate"]))
        chosen[name] = best
        print(json.dumps({"chosen": best}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "dataset": args.dataset,
                "forget_class": args.forget_class,
                "seed": args.seed,
                "original_epochs": args.original_epochs,
                "sizes": {
                    "forget": int(splits.forget.size),
                    "remain": int(splits.remain.size),
                    "val": int(val.size),
                },
                "reference": reference,
                "grids": {m: grids[m] for m in args.methods},
                "rows": rows,
                "chosen": chosen,
            },
            indent=1,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
