"""One experiment: original, retrain and CaMU per (forget set, seed), evaluated side by side."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from camu_jax import checkpointing, metrics, sharding
from camu_jax.data.loading import Dataset, load_dataset
from camu_jax.data.pipeline import input_spec_for
from camu_jax.data.splits import Splits, make_splits
from camu_jax.evaluation import predict_logits, reference_accuracies
from camu_jax.models import create_model
from camu_jax.reporting import atomic_write_bytes, build_reports, remove_stale_temp_files, summarize
from camu_jax.steps import init_variables
from camu_jax.training import train_model
from camu_jax.unlearning import unlearn
from experiments.configs import ExperimentConfig

METHODS = ("original", "retrain", "camu")


def _digest(splits: Splits) -> str:
    h = hashlib.sha256()
    for a in (splits.forget, splits.sample, np.asarray([splits.repeat])):
        h.update(np.ascontiguousarray(a, np.int64).tobytes())
    return h.hexdigest()[:12]


def _save_npz(path: Path, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _clean(x):
    """JSON-safe: NaN -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class Experiment:
    """Holds the data on device and runs every (forget set, seed) of a config."""

    def __init__(self, config: ExperimentConfig):
        config.validate()
        self.config = config
        self.mesh = sharding.make_mesh()
        # Every phase's batch is checked here, before any model is trained or file written.
        for phase, batch in (("", config.batch_size), ("CaMU ", config.camu_config().batch_size)):
            try:
                sharding.check_batch_size(batch, self.mesh)
            except ValueError as e:
                raise ValueError(f"{phase}{e}") from None
        self.data: Dataset = load_dataset(
            config.dataset,
            data_dir=config.data_dir,
            manual_dir=config.manual_dir,
            progress=config.progress,
        )
        self.model = create_model(config.model, num_classes=self.data.num_classes)
        self.spec = input_spec_for(config.dataset, config.model)
        self.input_shape = self.spec.input_shape(self.data.image_shape)
        self.images, self.labels, self.test_images = sharding.replicate(
            (self.data.train_images, self.data.train_labels, self.data.test_images), self.mesh
        )
        self.workdir = Path(config.workdir)
        self.ckpt_root = Path(config.checkpoint_dir or self.workdir / "checkpoints")

    # -- models ---------------------------------------------------------------------------
    def _meta(self, kind: str, seed: int, extra: dict | None = None) -> dict:
        """The identity of a trained model: every setting that changes its weights."""
        c = self.config
        return {
            "kind": kind,
            "dataset": c.dataset,
            "model": c.model,
            "num_classes": self.data.num_classes,
            "input_shape": list(self.input_shape),
            "seed": seed,
            "epochs": c.original_epochs,
            "batch_size": c.batch_size,
            "learning_rate": c.learning_rate,
            "weight_decay": c.weight_decay,
            "train_data_sha256": self.data.train_fingerprint,
            **(extra or {}),
        }

    def _train(self, kind: str, seed: int, items: np.ndarray, name: str, extra=None):
        """Trains (or restores) into `<kind>/<name>-<identity hash>`: a model trained with
        other settings lives in its own directory instead of being restored by mistake."""
        c = self.config
        meta = self._meta(kind, seed, extra)
        ident = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:8]
        variables = init_variables(self.model, jax.random.key(seed), self.input_shape)
        return train_model(
            self.model,
            variables,
            images=self.images,
            labels=self.labels,
            items=items,
            spec=self.spec,
            mesh=self.mesh,
            epochs=c.original_epochs,
            seed=seed,
            batch_size=c.batch_size,
            learning_rate=c.learning_rate,
            weight_decay=c.weight_decay,
            checkpoint_dir=self.ckpt_root / kind / f"{name}-{ident}",
            meta=meta,
            progress=c.progress,
            desc=f"{kind} seed {seed}",
        )

    def original(self, seed: int):
        """The original model on all of D: trained once per identity (`_meta`)."""
        c = self.config
        name = f"{c.dataset}-{c.model}-seed{seed}-ep{c.original_epochs}"
        return self._train("original", seed, np.arange(self.data.num_train), name)

    def retrain(self, seed: int, splits: Splits):
        """The gold standard: the same recipe on D_r only, once per identity and split."""
        c = self.config
        digest = _digest(splits)
        name = f"{c.dataset}-{c.model}-seed{seed}-ep{c.original_epochs}-split{digest}"
        return self._train("retrain", seed, splits.remain, name, {"split": digest})

    # -- evaluation -----------------------------------------------------------------------
    def inapplicable(self, splits: Splits) -> dict[str, str]:
        """Attacks these split sizes cannot support (reported as null, with the reason)."""
        sizes = splits.sizes()
        return metrics.inapplicable_attacks(
            n_forget=sizes["forget"],
            n_sample=sizes["sample"],
            n_remain=sizes["remain"],
            n_test=self.data.num_test,
        )

    def evaluate(
        self, variables: dict, splits: Splits, forget_classes, seed: int, name: str = "the model"
    ) -> dict:
        skip = self.inapplicable(splits)

        def attack(fn, **kwargs):
            return float("nan") if fn.__name__ in skip else fn(**kwargs)

        logits_tr = predict_logits(
            self.model, variables, self.images, spec=self.spec, mesh=self.mesh, name=name
        )
        logits_te = predict_logits(
            self.model, variables, self.test_images, spec=self.spec, mesh=self.mesh, name=name
        )
        y_tr, y_te = self.data.train_labels, self.data.test_labels
        out = reference_accuracies(
            train_logits=logits_tr,
            train_labels=y_tr,
            test_logits=logits_te,
            test_labels=y_te,
            splits=splits,
            forget_classes=forget_classes,
        )
        p_tr, p_te = metrics.softmax(logits=logits_tr), metrics.softmax(logits=logits_te)
        out["mia"] = attack(
            metrics.reference_mia,
            sample_probs=p_tr[splits.sample],
            test_probs=p_te,
            forget_probs=p_tr[splits.forget],
            seed=seed,
        )
        mia_eff = attack(
            metrics.mia_efficacy,
            remain_probs=p_tr[splits.remain],
            remain_labels=y_tr[splits.remain],
            test_probs=p_te,
            test_labels=y_te,
            forget_probs=p_tr[splits.forget],
            forget_labels=y_tr[splits.forget],
            seed=seed,
        )
        ta = out["test_remain_acc"] if forget_classes else out["test_acc"]
        scores = metrics.unlearning_scores(
            forget_acc=out["forget_train_acc"],
            remain_acc=out["remain_train_acc"],
            test_acc=ta,
            mia_efficacy=mia_eff,
        )
        out.update(UA=scores["UA"], RA=scores["RA"], TA=scores["TA"], mia_efficacy=mia_eff)
        out["loss_attack"] = attack(
            metrics.loss_attack,
            forget_losses=metrics.per_example_cross_entropy(
                probs_or_logits=logits_tr[splits.forget],
                labels=y_tr[splits.forget],
                from_logits=True,
            ),
            test_losses=metrics.per_example_cross_entropy(
                probs_or_logits=logits_te, labels=y_te, from_logits=True
            ),
            seed=seed,
        )
        return out

    def relearn(self, variables: dict, splits: Splits, seed: int, name: str) -> dict:
        """The paper's relearning check: one epoch of the original recipe on D_r, recording
        acc(D_r) - acc(D_f) every `relearn_every` batches (on a fixed subset of at most 10,000
        D_r items, for speed; all of D_f up to 10,000)."""
        c = self.config
        rng = np.random.default_rng([seed, 5])
        remain = np.sort(rng.choice(splits.remain, min(10_000, splits.remain.size), replace=False))
        forget = splits.forget[:10_000]
        y = self.data.train_labels
        batches, gaps = [], []

        def record(step, v):
            pr = predict_logits(
                self.model, v, self.images, spec=self.spec, mesh=self.mesh, rows=remain
            )
            pf = predict_logits(
                self.model, v, self.images, spec=self.spec, mesh=self.mesh, rows=forget
            )
            gap = 100 * np.mean(pr.argmax(-1) == y[remain]) - 100 * np.mean(
                pf.argmax(-1) == y[forget]
            )
            batches.append(int(step))
            gaps.append(float(gap))

        record(0, variables)
        train_model(
            self.model,
            jax.tree.map(np.asarray, variables),
            images=self.images,
            labels=self.labels,
            items=splits.remain,
            spec=self.spec,
            mesh=self.mesh,
            epochs=1,
            seed=seed,
            batch_size=c.batch_size,
            learning_rate=c.learning_rate,
            weight_decay=c.weight_decay,
            chunk_steps=c.relearn_every,
            callback=record,
            progress=c.progress,
            desc=f"relearn {name}",
        )
        return {"batches": batches, "gap": gaps}

    # -- one run --------------------------------------------------------------------------
    def splits(self, seed: int, spec) -> Splits:
        return make_splits(
            self.data.train_labels, spec, seed=seed, num_classes=self.data.num_classes
        )

    def run_one(self, seed: int, forget_classes, splits: Splits, original: dict, original_seconds):
        c = self.config
        tag = "all" if forget_classes is None else "-".join(map(str, forget_classes))
        run_name = f"{c.scenario}-{tag}-seed{seed}"
        _save_npz(self.workdir / "splits" / f"{run_name}.npz", splits.to_arrays())
        retrained, rinfo = self.retrain(seed, splits)
        camu_vars, cinfo = unlearn(
            self.model,
            original,
            images=self.images,
            labels=self.labels,
            splits=splits,
            num_classes=self.data.num_classes,
            spec=self.spec,
            mesh=self.mesh,
            config=c.camu_config(),
            seed=seed,
            progress=c.progress,
        )
        seconds = {
            "original": original_seconds,
            "retrain": rinfo["seconds"],
            "camu": cinfo["seconds"],
        }
        models = {"original": original, "retrain": retrained, "camu": camu_vars}
        results = {}
        for method, v in models.items():
            name = f"the {method} model of {run_name}"
            results[method] = self.evaluate(v, splits, forget_classes, seed, name)
            results[method]["seconds"] = seconds[method]
        # Saved once its evaluation has shown finite outputs: finite but huge weights (a far
        # too high learning rate) pass every check during unlearning.
        checkpointing.save_next(
            self.ckpt_root / "camu" / f"{c.dataset}-{c.model}-{run_name}",
            camu_vars,
            self._meta("camu", seed, {"split": _digest(splits), "run": run_name}),
        )
        keys = ("UA", "RA", "TA", "mia_efficacy")
        for method, r in results.items():
            r["avg_gap"] = metrics.avg_gap(r, results["retrain"], keys=keys)
            r["rte"] = (
                None
                if method == "original"
                else metrics.rte(
                    retrain_seconds=seconds["retrain"], unlearn_seconds=seconds[method]
                )
            )
        results["camu"]["construct_seconds"] = cinfo["construct_seconds"]
        run = {
            "forget_class": (
                forget_classes[0] if forget_classes and len(forget_classes) == 1 else forget_classes
            ),
            "seed": seed,
            "split_sizes": {**splits.sizes(), "test": self.data.num_test},
            "split_file": f"splits/{run_name}.npz",
            "methods": results,
        }
        if skip := self.inapplicable(splits):
            run["not_applicable"] = skip
        if c.relearn:
            run["relearn"] = {
                m: self.relearn(models[m], splits, seed, f"{m} {run_name}")
                for m in ("camu", "retrain")
            }
        return run


def run_experiment(config: ExperimentConfig, *, log=print) -> dict:
    """Runs every seed and forget set of `config`; writes `results.json` and the reports
    (atomically, after every run) into `config.workdir`; returns the results dict."""
    exp = Experiment(config)
    # Every split is built (and so validated) before anything is trained or written.
    plan = {
        seed: [(classes, exp.splits(seed, spec)) for classes, spec in config.forget_specs()]
        for seed in config.seeds
    }
    for seed, runs in plan.items():
        for classes, splits in runs:
            for attack, why in exp.inapplicable(splits).items():
                where = f"seed {seed}" + ("" if classes is None else f", classes {classes}")
                log(f"note: {attack} not applicable ({where}): {why}")
    workdir = exp.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(workdir, workdir / "splits")  # Left by a killed run.
    results = {
        # The CaMU settings actually used, preset included.
        "config": _clean(
            dataclasses.asdict(dataclasses.replace(config, camu=config.camu_config()))
        ),
        "dataset": config.dataset,
        "scenario": config.scenario,
        "model": config.model,
        "devices": [str(d) for d in exp.mesh.devices.flat],
        "versions": {"jax": jax.__version__},
        "runs": [],
    }
    phases = []
    for seed in config.seeds:
        t = time.perf_counter()
        original, oinfo = exp.original(seed)
        phases.append(
            {
                "phase": f"original seed {seed}",
                "seconds": time.perf_counter() - t,
                "restored": oinfo["epochs_run"] == 0,
            }
        )
        for forget_classes, splits in plan[seed]:
            t = time.perf_counter()
            run = exp.run_one(seed, forget_classes, splits, original, oinfo["seconds"])
            phases.append(
                {"phase": f"run {forget_classes} seed {seed}", "seconds": time.perf_counter() - t}
            )
            results["runs"].append(run)
            results["summary"] = summarize(results["runs"])
            results["phases"] = phases
            atomic_write_bytes(
                workdir / "results.json", json.dumps(_clean(results), indent=2).encode()
            )
            build_reports(_clean(results), workdir)
            log(format_table(run))
    return _clean(results)


def format_table(run: dict) -> str:
    """A plain-text table of one run's metrics, one row per method."""
    cols = [
        ("remain_train_acc", "D_r acc"),
        ("forget_train_acc", "D_f acc"),
        ("test_acc", "test"),
        ("test_remain_acc", "test rem"),
        ("test_forget_acc", "test fgt"),
        ("mia", "MIA"),
        ("mia_efficacy", "MIA-eff"),
        ("avg_gap", "AvgGap"),
        ("seconds", "time s"),
    ]
    head = f"forget {run['forget_class']} seed {run['seed']}  sizes {run['split_sizes']}"
    lines = [head, f"{'method':<10}" + "".join(f"{h:>10}" for _, h in cols)]
    for method, r in run["methods"].items():
        cells = "".join(
            f"{'-':>10}"
            if r.get(k) is None or (isinstance(r.get(k), float) and math.isnan(r[k]))
            else f"{r[k]:>10.2f}"
            for k, _ in cols
        )
        lines.append(f"{method:<10}{cells}")
    return "\n".join(lines)
