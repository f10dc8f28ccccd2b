"""Tunes unlearning methods for a dataset's CNN on a validation split held out of D_r.

    python -m experiments.tune --dataset mnist --manual-dir ../shared/data/mnist \\
        --out docs/tuning/mnist_class0.json ft ga ssd
    python -m experiments.tune --dataset digits --original-epochs 20 --seed 0,1,2,3,4 \\
        --out docs/tuning/digits_class0.json all      # the digits defaults' record

Protocol (docs/methods.md): 10 % of D_r (seeded, `[seed, 10]`) is held out as a validation
split V; the test set is never used. The original is trained on D \\ V and the retrained model
on D_r \\ V (same seed and recipe, `--original-epochs`); every setting of a method's grid
unlearns the original with D_r \\ V as its remaining set and scores
`|acc(D_f) - acc_retrain(D_f)| + |acc(V) - acc_retrain(V)|` (percent points); the lowest score
wins, ties going to the grid's earlier setting (grids list cheaper settings first). A setting
that diverges scores infinity. With several seeds (`--seed 0,1,2`) each seed has its own split,
original and retrained model, every setting unlearns each seed's original (one population),
and its score is the mean of its seeds' scores: a choice that holds across originals, not one
on the knife edge of one (the digits record uses five). One JSON line per setting is
printed; `--out` gets them all with the reference accuracies, the grids and the choices. A
method's grid points that differ only in data settings (learning rates, coefficients:
`Method.static_settings`) are unlearned as one population on one compiled program
(`--population-size 1`: one at a time).

Grids: `GRIDS` (MNIST's, every dataset without its own) or the dataset's (`DATASET_GRIDS`:
digits). A grid setting is applied over the method's defaults for `--dataset`
(`camu_jax.methods.get(name, dataset=...)`: the class defaults, the MNIST CNN's, with the
dataset's entry of `camu_jax.methods.defaults` over them); the digits grids cover every field
that entry sets, so its record does not depend on the entry it chose.

SSD's importances do not depend on alpha or lambda: they are computed once and each
(alpha, lambda) dampens the original with `ssd.dampen`, the function SSD's last stage applies;
the chosen setting is then run end to end as a check.

The trained original and retrained models are cached as `.npz` arrays (read back with
`allow_pickle=False`, checked against the model's shapes) under `--cache`, by default
`~/.cache/camu_jax/tune`: a cache file can hold only numbers, never code to run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import zipfile
from pathlib import Path

# name -> {setting: values}, each centred on the method's official setting (its docstring).
GRIDS = {
    "ft": {"learning_rate": [0.03, 0.1, 0.3], "epochs": [3, 10]},
    "ga": {"learning_rate": [1e-5, 1e-4, 1e-3, 1e-2], "epochs": [1, 3]},
    "neggrad_plus": {"learning_rate": [0.001, 0.01, 0.05], "epochs": [1, 3]},
    "rl": {"learning_rate": [0.001, 0.01, 0.05], "epochs": [1, 3]},
    "amnesiac": {"learning_rate": [1e-5, 1e-4, 1e-3], "epochs": [1, 3]},
    "l1_sparse": {"learning_rate": [0.01, 0.03], "epochs": [1, 3], "gamma": [1e-4, 5e-4]},
    "salun": {"learning_rate": [0.001, 0.01, 0.05], "epochs": [1, 3]},
    "boundary_shrink": {"learning_rate": [1e-5, 1e-4, 1e-3], "epochs": [1, 10]},
    "boundary_expand": {"learning_rate": [1e-5, 1e-4, 1e-3], "epochs": [1, 10]},
    # UNSIR: impair and repair rates scaled together (the official 2:1).
    "unsir": {"lr_scale": [1.0, 0.1, 0.01], "repair_epochs": [1, 3]},
    "bad_teacher": {"learning_rate": [1e-4, 1e-3, 1e-2], "epochs": [1, 3]},
    "scrub": {"learning_rate": [5e-4, 5e-3, 5e-2], "epochs": [3, 5]},
    # I_D holds D_f's own batches, so I_f > alpha * I_D needs alpha below (all batches) /
    # (D_f batches), ~10 for a class of a 10-class dataset; on MNIST even alpha 0.5 with
    # lambda 0.1 left D_f 95 % recognised, hence the small alphas and lambdas.
    "ssd": {"alpha": [0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0], "lam": [0.001, 0.01, 0.1, 1.0]},
    # eta spans 3.5 decades; MNIST's forget accuracy falls from ~97 % to 0 between 1e-3 and 3e-3.
    "unrolling": {
        "learning_rate": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 1e-2, 3e-2]
    },
}


# Digits (scikit-learn's 8x8 digits, the main job's default; D_f of a class ~140 images, D_r
# ~1300), tuned on five seeds (docs/methods.md, "digits"). The MNIST grids above, centred on
# settings for 6000-image classes, leave most methods at a few steps an epoch (batch 256 over
# D_f is one step) and change nothing on the digits originals; a first pass on seed 0 over
# wider grids (docs/tuning/digits_exploration/) found where each method starts to forget, and
# these grids span that region. Batch sizes and epochs are static settings (one compiled program
# per combination), learning rates and coefficients data (one population).
DIGITS_GRIDS = {
    "ft": {"batch_size": [32, 16], "learning_rate": [0.02, 0.03, 0.05], "epochs": [10, 20]},
    "ga": {
        "batch_size": [32, 16],
        "learning_rate": [0.003, 0.005, 0.007, 0.008, 0.0085, 0.009, 0.01],
        "epochs": [5, 10],
    },
    "neggrad_plus": {
        "batch_size": [32],
        "alpha": [0.95, 0.94, 0.92, 0.9],
        "learning_rate": [0.05, 0.07, 0.1, 0.13],
        "epochs": [3, 5],
    },
    "rl": {"batch_size": [256, 64], "learning_rate": [0.01, 0.03, 0.1], "epochs": [2, 5]},
    "amnesiac": {"batch_size": [128, 32], "learning_rate": [1e-4, 1e-3, 1e-2], "epochs": [1, 3]},
    "l1_sparse": {
        "batch_size": [32],
        "learning_rate": [0.03, 0.05],
        "epochs": [10, 20],
        "gamma": [5e-4, 1e-3, 2e-3, 5e-3],
    },
    "salun": {"batch_size": [256, 64], "learning_rate": [0.01, 0.03, 0.1], "epochs": [2, 5]},
    # The official FGSM step 0.1 flips too few of digits' labels to forget (D_f stays ~80 %);
    # 0.3 forgets but costs V, hence the steps between.
    "boundary_shrink": {
        "batch_size": [64, 16],
        "learning_rate": [3e-4, 1e-3, 3e-3],
        "epochs": [1, 3, 10],
        "bound": [0.1, 0.15, 0.2, 0.25, 0.3],
    },
    "boundary_expand": {
        "batch_size": [64, 32],
        "learning_rate": [3e-5, 5e-5, 1e-4, 2e-4, 1e-3],
        "epochs": [1, 5, 10],
    },
    "unsir": {
        "batch_size": [256, 32],
        "noise_repeats": [20, 2],
        "lr_scale": [1.0, 0.1, 0.01],
        "repair_epochs": [1, 5],
    },
    "bad_teacher": {"batch_size": [256, 32], "learning_rate": [1e-4, 1e-3, 1e-2], "epochs": [1, 3]},
    "scrub": {
        "batch_size": [256, 32],
        "forget_batch_size": [512, 32],
        "learning_rate": [5e-4, 1e-3, 2e-3, 3e-3, 5e-3],
        "epochs": [3, 5],
    },
    # MNIST's grid with the steps between alpha 0.1 and 1, where digits' D_f is removed and
    # V's cost falls fast.
    "ssd": {
        "alpha": [0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 50.0],
        "lam": [0.001, 0.01, 0.1, 1.0],
    },
    "unrolling": {"learning_rate": [1e-3, 3e-3, 1e-2, 0.012, 0.015, 0.02, 0.025, 0.03, 0.1]},
}
DATASET_GRIDS = {"digits": DIGITS_GRIDS}


def grids_for(dataset: str) -> dict:
    """The grids searched for `dataset`: its own (`DATASET_GRIDS`), else the MNIST `GRIDS`."""
    return DATASET_GRIDS.get(dataset, GRIDS)


DEFAULT_CACHE = os.path.join("~", ".cache", "camu_jax", "tune")


def _leaf_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def save_cache(path: Path, trees: dict) -> None:
    """`{name: variables}` as one `.npz` (`name/params/.../kernel` -> array), written to a temp
    file and renamed, so a killed run leaves the old cache or none."""
    import jax
    import numpy as np

    arrays = {
        f"{name}/{_leaf_name(p)}": np.asarray(leaf)
        for name, tree in trees.items()
        for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def load_cache(path: Path, like: dict) -> dict:
    """The trees `save_cache` wrote, each shaped as `like[name]` (a variables pytree); raises
    ValueError naming `path` if it is not such a file. Never unpickles: object arrays are
    refused by `allow_pickle=False`."""
    import jax
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    # Not a zip, a damaged one, or one holding object arrays (pickles, refused unread).
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"tuning cache {path} is not a readable .npz of arrays ({e}); delete it"
        ) from None
    out, used = {}, set()
    for name, tree in like.items():

        def take(p, ref, name=name):
            key = f"{name}/{_leaf_name(p)}"
            arr = arrays.get(key)
            if arr is None or arr.shape != np.shape(ref) or arr.dtype != np.asarray(ref).dtype:
                got = "missing" if arr is None else f"{arr.dtype}{list(arr.shape)}"
                raise ValueError(
                    f"tuning cache {path}: {key} is {got}, expected "
                    f"{np.asarray(ref).dtype}{list(np.shape(ref))}; delete it"
                )
            used.add(key)
            return arr

        out[name] = jax.tree_util.tree_map_with_path(take, tree)
    if extra := sorted(set(arrays) - used):
        raise ValueError(f"tuning cache {path} holds unexpected arrays {extra[:3]}; delete it")
    return out


def settings(grid: dict) -> list[dict]:
    """Every setting of a grid, in grid order."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def overrides(name: str, setting: dict, original_epochs: int) -> dict:
    """The config fields a grid setting stands for."""
    kw = dict(setting)
    if "lr_scale" in kw:
        s = kw.pop("lr_scale")
        kw.update(impair_lr=0.02 * s, repair_lr=0.01 * s)
    if name == "unrolling":
        kw["original_epochs"] = original_epochs  # the update is eta * E / b times D_f's gradients
    return kw


def seed_list(text: str) -> list[int]:
    """`--seed 0` or `--seed 0,1,2`: distinct non-negative integers."""
    try:
        seeds = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are integers, got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds are distinct non-negative integers: {text!r}")
    return seeds


def split_validation(splits, seed: int, fraction: float = 0.1):
    """(splits with D_r \\ V as the remaining set and the sample set's source, V)."""
    import numpy as np

    from camu_jax.data.splits import Splits

    rng = np.random.default_rng([seed, 10])
    val = np.sort(
        rng.choice(splits.remain, size=round(fraction * splits.remain.size), replace=False)
    )
    kept = np.setdiff1d(splits.remain, val)
    sample = np.sort(rng.choice(kept, size=min(kept.size, splits.forget.size), replace=False))
    held = np.sort(np.concatenate([np.asarray(splits.held_out, np.int64), val]))
    return (
        Splits(
            forget=splits.forget, remain=kept, sample=sample, repeat=splits.repeat, held_out=held
        ),
        val,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "methods",
        nargs="+",
        help=f"'all' or any of {', '.join(GRIDS)} (digits: DIGITS_GRIDS, others: GRIDS)",
    )
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--manual-dir", default=None)
    p.add_argument("--forget-class", type=int, default=0)
    p.add_argument(
        "--seed",
        type=seed_list,
        default=[0],
        help="seed, or comma-separated seeds (default: %(default)s): each has its own "
        "validation split, original and retrained model; a setting's score is the mean of "
        "its seeds' scores (a setting diverging on any seed scores infinity)",
    )
    p.add_argument("--original-epochs", type=int, default=5)
    p.add_argument(
        "--cache",
        default=DEFAULT_CACHE,
        help="folder of trained originals (.npz arrays; default: %(default)s)",
    )
    p.add_argument("--out", required=True)
    p.add_argument(
        "--population-size",
        type=int,
        default=None,
        help="grid points unlearned at once (default: the layout the engine chooses; 1: one "
        "at a time). A method's points that differ only in data settings run as one "
        "population on one program",
    )
    p.add_argument(
        "--grid",
        default="{}",
        help='JSON replacing grids, e.g. \'{"ga": {"learning_rate": [0.003], "epochs": [1]}}\'',
    )
    args = p.parse_args(argv)
    try:
        grids = {**grids_for(args.dataset), **json.loads(args.grid)}
    except json.JSONDecodeError as e:
        print(f"error: --grid is not JSON ({e}): {args.grid!r}", file=sys.stderr)
        return 2
    names = list(grids_for(args.dataset)) if args.methods == ["all"] else args.methods
    unknown = [m for m in names if m not in grids]
    if unknown:
        print(f"error: no grid for {unknown}; known: {', '.join(grids)}", file=sys.stderr)
        return 2

    import jax
    import numpy as np

    from camu_jax import methods, sharding
    from camu_jax.data import DeviceData, input_spec_for, load_dataset
    from camu_jax.data.splits import Splits
    from camu_jax.methods.ssd import SSDWithImportances, dampen, selection
    from camu_jax.models import create_model, init_variables
    from camu_jax.prediction import predict
    from camu_jax.training import TrainConfig, train_population

    d = load_dataset(args.dataset, manual_dir=args.manual_dir, progress=False)
    if not 0 <= args.forget_class < d.num_classes:
        print(f"error: --forget-class {args.forget_class} is not a class", file=sys.stderr)
        return 2
    spec = input_spec_for(args.dataset, "cnn")
    train = DeviceData.put(d.train_images, d.train_labels, spec=spec, mesh=sharding.make_mesh())
    model = create_model("cnn", num_classes=d.num_classes)
    labels = np.asarray(d.train_labels)
    forget = np.flatnonzero(labels == args.forget_class)
    full = Splits(forget=forget, remain=np.setdiff1d(np.arange(labels.size), forget), sample=forget)
    seeds = args.seed
    # Per seed: its validation split, original and retrained model (cached), scored rows.
    per: list[dict] = []
    for seed in seeds:
        splits, val = split_validation(full, seed)
        name = f"{args.dataset}_c{args.forget_class}_s{seed}_e{args.original_epochs}.npz"
        cache = Path(args.cache).expanduser() / name
        init = init_variables(model, jax.random.key(seed), train.input_shape)
        if cache.exists():
            try:
                cached = load_cache(cache, {"original": init, "retrain": init})
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            original, retrain = cached["original"], cached["retrain"]
        else:
            out = train_population(
                model,
                [init, init],
                data=train,
                items=[np.sort(np.concatenate([splits.forget, splits.remain])), splits.remain],
                seeds=[seed, seed],
                config=TrainConfig(epochs=args.original_epochs),
                progress=False,
            )
            original, retrain = (jax.tree.map(np.asarray, v) for v, _ in out)
            save_cache(cache, {"original": original, "retrain": retrain})
        per.append(
            dict(
                seed=seed,
                splits=splits,
                val=val,
                original=original,
                retrain=retrain,
                rows_fv=np.concatenate([splits.forget, val]),
            )
        )

    def scores(variables, k: int = 0) -> dict:
        """Accuracies on seed k's D_f and V."""
        rows_fv = per[k]["rows_fv"]
        stacked = jax.tree.map(lambda x: np.asarray(x)[None], variables)
        hit = predict(model, stacked, train, rows_fv[None])[0].argmax(-1) == labels[rows_fv]
        n = per[k]["splits"].forget.size
        return {"acc_forget": 100.0 * hit[:n].mean(), "acc_val": 100.0 * hit[n:].mean()}

    for k, p_k in enumerate(per):
        p_k["reference"] = {
            "original": scores(p_k["original"], k),
            "retrain": scores(p_k["retrain"], k),
        }

    def mean_scores(items: list[dict]) -> dict:
        return {key: float(np.mean([s[key] for s in items])) for key in items[0]}

    if len(per) == 1:
        reference = per[0]["reference"]
    else:  # the seeds' mean, each seed's own in `references`
        reference = {
            m: mean_scores([p_k["reference"][m] for p_k in per]) for m in ("original", "retrain")
        }

    def gap(s: dict, k: int = 0) -> float:
        target = per[k]["reference"]["retrain"]
        return abs(s["acc_forget"] - target["acc_forget"]) + abs(s["acc_val"] - target["acc_val"])

    def score_row(row: dict, per_seed: list[dict]) -> None:
        """`row` gets the seeds' mean accuracies and score (each seed scored against its own
        retrained model), and with several seeds each seed's own in `seeds`."""
        row.update(
            acc_forget=float(np.mean([s["acc_forget"] for s in per_seed])),
            acc_val=float(np.mean([s["acc_val"] for s in per_seed])),
            score=float(np.mean([s["score"] for s in per_seed])),
        )
        if len(per) > 1:
            row["seeds"] = [
                {"seed": p_k["seed"], **s} for p_k, s in zip(per, per_seed, strict=True)
            ]

    def run(method) -> list:
        """`(variables, info)` of `method` per seed, one population."""
        return methods.run_population(
            method,
            model,
            [p_k["original"] for p_k in per],
            data=train,
            splits=[p_k["splits"] for p_k in per],
            seeds=seeds,
            num_classes=d.num_classes,
            progress=False,
        )

    def run_grid(configs: list) -> list:
        """Per config, `(variables or None, info)` per seed: the configs that share a program
        (they differ only in data settings) and the seeds as one population, a diverged
        member recorded."""
        out = [None] * len(configs)
        groups: dict = {}
        for i, c in enumerate(configs):
            groups.setdefault(c.skeleton(), []).append(i)
        for indices in groups.values():
            members = [(i, k) for i in indices for k in range(len(per))]
            results = methods.run_population(
                [configs[i] for i, _ in members],
                model,
                [per[k]["original"] for _, k in members],
                data=train,
                splits=[per[k]["splits"] for _, k in members],
                seeds=[per[k]["seed"] for _, k in members],
                num_classes=d.num_classes,
                population_size=args.population_size,
                progress=False,
                on_divergence="record",
            )
            for (i, _), result in zip(members, results, strict=True):
                out[i] = [*(out[i] or []), result]
        return out

    print(json.dumps({"reference": reference}), flush=True)
    rows, chosen = [], {}

    def write() -> None:  # after every method: a killed run keeps what it finished
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        record = {
            "command": "python -m experiments.tune " + " ".join(argv or sys.argv[1:]),
            "dataset": args.dataset,
            "forget_class": args.forget_class,
            "seed": seeds[0],
            "original_epochs": args.original_epochs,
            "sizes": {
                "forget": int(forget.size),
                "remain": int(per[0]["splits"].remain.size),
                "val": int(per[0]["val"].size),
            },
            "reference": reference,
            "grids": {m: grids[m] for m in chosen},
            "rows": rows,
            "chosen": chosen,
        }
        if len(per) > 1:
            record["seeds"] = list(seeds)
            record["references"] = [{"seed": p_k["seed"], **p_k["reference"]} for p_k in per]
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(args.out)

    for method_name in names:
        mine = []
        grid = settings(grids[method_name])
        if method_name == "ssd":
            ssd_base = methods.get("ssd", dataset=args.dataset)
            exposed = [v for v, _ in run(SSDWithImportances(batch_size=ssd_base.batch_size))]
        else:
            outs = run_grid(
                [
                    methods.get(
                        method_name,
                        dataset=args.dataset,
                        **overrides(method_name, st, args.original_epochs),
                    )
                    for st in grid
                ]
            )
        for j, setting in enumerate(grid):
            row = {"method": method_name, "setting": setting}
            if method_name == "ssd":
                kw = dict(alpha=setting["alpha"], lam=setting["lam"])
                per_seed, selected = [], []
                for k, (p_k, ex) in enumerate(zip(per, exposed, strict=True)):
                    params = dampen(p_k["original"]["params"], ex["i_f"], ex["i_d"], **kw)
                    s = scores({"params": params, "batch_stats": p_k["original"]["batch_stats"]}, k)
                    per_seed.append({**s, "score": gap(s, k)})
                    mask = selection(ex["i_f"], ex["i_d"], alpha=setting["alpha"])
                    selected.append(int(sum(np.sum(x) for x in jax.tree.leaves(mask))))
                row["selected"] = selected[0] if len(per) == 1 else selected
                score_row(row, per_seed)
            else:
                try:
                    per_seed = []
                    for k, (variables, info) in enumerate(outs[j]):
                        if variables is None:
                            raise FloatingPointError(info["diverged"])
                        s = scores(variables, k)  # raises on non-finite logits
                        per_seed.append({**s, "score": gap(s, k), "steps": info["steps"]})
                    row["steps"] = per_seed[0]["steps"]
                    score_row(row, [{k: v for k, v in s.items() if k != "steps"} for s in per_seed])
                except FloatingPointError as e:  # a diverging setting is a result, not a crash
                    row.update(diverged=str(e)[:200], score=float("inf"))
            rows.append(row)
            mine.append(row)
            print(json.dumps(row), flush=True)
        best = min(mine, key=lambda r: r["score"])  # min keeps the first of equal scores
        if method_name == "ssd":
            end_to_end = methods.get("ssd", dataset=args.dataset, **best["setting"])
            checked = [scores(v, k) for k, (v, _) in enumerate(run(end_to_end))]
            best = {**best, "end_to_end": mean_scores(checked)}
        chosen[method_name] = best
        print(json.dumps({"chosen": best}), flush=True)
        write()

    return 0


if __name__ == "__main__":
    sys.exit(main())
