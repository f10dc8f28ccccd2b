"""Per-dataset defaults of the unlearning methods: `{dataset: {method: {field: value}}}`.

A method's class defaults are its settings for the MNIST CNN (its paper's or official code's,
else tuned on MNIST: docs/methods.md). A dataset whose data or model those settings do not
suit gets its own entry here, chosen by the tuning protocol of `experiments/tune.py` on that
dataset (a validation split held out of D_r; the test set is never used) and recorded in
`docs/tuning/`. `camu_jax.methods.get(name, dataset=...)` applies an entry over the class
defaults; keyword overrides win over both. A dataset or method without an entry gets the class
defaults. CaMU has none: its settings come from `camu_jax.methods.camu.camu_preset`.
"""

from __future__ import annotations

DATASET_DEFAULTS: dict[str, dict[str, dict]] = {
    # scikit-learn's 8x8 digits with the reference CNN (the main job's default): D_f of a class
    # is ~140 images, so the MNIST settings give one or two steps an epoch (batch 256 over D_f
    # is one) and most methods left the 20-epoch originals untouched (docs/methods.md,
    # "digits"). Each entry is the choice of `python -m experiments.tune --dataset digits
    # --original-epochs 20 --seed 0,1,2,3,4 --out docs/tuning/digits_class0.json all` (class 0;
    # score: mean over the seeds of |D_f - retrain's D_f| + |V - retrain's V|, percent points;
    # accuracies are the seeds' means), exactly the fields its grid (tune.DIGITS_GRIDS) sets.
    "digits": {
        # docs/tuning/digits_class0.json, chosen["ft"]: D_f 0.0 %, V 95.7 %,
        # score 3.41 (seeds 0-4: 10.85, 0.00, 0.78, 4.65, 0.78)
        "ft": {"batch_size": 16, "learning_rate": 0.03, "epochs": 20},
        # docs/tuning/digits_class0.json, chosen["ga"]: D_f 69.0 %, V 91.5 %,
        # score 76.24 (seeds 0-4: 100.78, 100.78, 22.48, 55.61, 101.55): ascent forgets all at
        # once and takes the model with it, or not at all; no setting forgets and keeps D_r
        "ga": {"batch_size": 32, "learning_rate": 0.005, "epochs": 5},
        # docs/tuning/digits_class0.json, chosen["neggrad_plus"]: D_f 62.8 %, V 82.9 %,
        # score 78.92 (seeds 0-4: 100.00, 100.78, 74.42, 101.55, 17.86): as GA, forgets only
        # by collapsing the model
        "neggrad_plus": {"batch_size": 32, "alpha": 0.92, "learning_rate": 0.1, "epochs": 3},
        # docs/tuning/digits_class0.json, chosen["rl"]: D_f 0.7 %, V 96.9 %,
        # score 2.87 (seeds 0-4: 4.65, 2.17, 0.78, 3.10, 3.65)
        "rl": {"batch_size": 64, "learning_rate": 0.03, "epochs": 5},
        # docs/tuning/digits_class0.json, chosen["amnesiac"]: D_f 0.0 %, V 97.8 %,
        # score 0.93 (seeds 0-4: 3.10, 0.00, 1.55, 0.00, 0.00)
        "amnesiac": {"batch_size": 32, "learning_rate": 0.001, "epochs": 3},
        # docs/tuning/digits_class0.json, chosen["l1_sparse"]: D_f 0.0 %, V 98.8 %,
        # score 0.00 (seeds 0-4: 0.00, 0.00, 0.00, 0.00, 0.00)
        "l1_sparse": {"batch_size": 32, "learning_rate": 0.03, "epochs": 20, "gamma": 0.0005},
        # docs/tuning/digits_class0.json, chosen["salun"]: D_f 1.0 %, V 98.6 %,
        # score 1.75 (seeds 0-4: 0.00, 2.95, 0.78, 2.25, 2.80)
        "salun": {"batch_size": 64, "learning_rate": 0.01, "epochs": 5},
        # docs/tuning/digits_class0.json, chosen["boundary_shrink"]: D_f 5.0 %, V 92.7 %,
        # score 11.08 (seeds 0-4: 4.58, 8.53, 18.24, 16.30, 7.77)
        "boundary_shrink": {"batch_size": 16, "learning_rate": 0.0003, "epochs": 10, "bound": 0.3},
        # docs/tuning/digits_class0.json, chosen["boundary_expand"]: D_f 0.1 %, V 82.6 %,
        # score 16.26 (seeds 0-4: 23.26, 14.73, 17.75, 16.28, 9.30)
        "boundary_expand": {"batch_size": 64, "learning_rate": 0.001, "epochs": 10},
        # docs/tuning/digits_class0.json, chosen["unsir"]: D_f 0.0 %, V 98.6 %,
        # score 0.16 (seeds 0-4: 0.00, 0.00, 0.78, 0.00, 0.00); lr_scale 0.1: the rates below
        "unsir": {
            "batch_size": 32,
            "noise_repeats": 20,
            "repair_epochs": 5,
            "impair_lr": 0.002,
            "repair_lr": 0.001,
        },
        # docs/tuning/digits_class0.json, chosen["bad_teacher"]: D_f 0.8 %, V 96.9 %,
        # score 2.70 (seeds 0-4: 1.55, 0.78, 1.55, 6.52, 3.10)
        "bad_teacher": {"batch_size": 32, "learning_rate": 0.001, "epochs": 1},
        # docs/tuning/digits_class0.json, chosen["scrub"]: D_f 20.0 %, V 96.9 %,
        # score 21.86 (seeds 0-4: 1.55, 0.00, 5.43, 100.78, 1.55)
        "scrub": {"batch_size": 32, "forget_batch_size": 32, "learning_rate": 0.003, "epochs": 5},
        # docs/tuning/digits_class0.json, chosen["ssd"]: D_f 1.4 %, V 94.6 %,
        # score 5.58 (seeds 0-4: 3.02, 7.75, 0.78, 9.30, 7.07)
        "ssd": {"alpha": 0.4, "lam": 0.01},
        # docs/tuning/digits_class0.json, chosen["unrolling"]: D_f 8.7 %, V 78.8 %,
        # score 28.67 (seeds 0-4: 12.72, 34.48, 60.47, 10.08, 25.61); E = 20, the main
        # job's originals' epochs
        "unrolling": {"learning_rate": 0.015, "original_epochs": 20},
    },
}


def for_dataset(dataset: str | None, name: str) -> dict:
    """`{field: value}` of method `name`'s defaults for `dataset` over its class defaults
    (empty for None, a dataset without an entry, or a method without one); ValueError naming
    an unknown dataset with the list of known ones."""
    if dataset is None:
        return {}
    from camu_jax.data import catalog

    if dataset not in catalog.NAMES:
        raise ValueError(
            f"unknown dataset {dataset!r} for the defaults of method {name!r}; "
            f"known datasets: {', '.join(catalog.NAMES)}"
        )
    return dict(DATASET_DEFAULTS.get(dataset, {}).get(name, {}))
