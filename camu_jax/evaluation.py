"""Evaluating models: batched eval-mode forward passes over populations, and the metrics.

The forward passes are `camu_jax.prediction.predict` (re-exported here with `predict_logits`
and `check_logits`): logits or embeddings of any number of models (a leading member axis) on
rows of a device-resident split, one compiled program per shape. `score` turns one model's
logits into every metric of the results table (the reference's accuracies, the three
membership attacks, the SalUn scores); `evaluate` does both for a population, fitting the
attacks of different members in parallel on the host's cores.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from tqdm.auto import tqdm

from camu_jax import engine, metrics, sharding
from camu_jax.checks import check_image_sizes, check_model_classes, check_splits
from camu_jax.data.pipeline import DeviceData
from camu_jax.data.splits import Splits
from camu_jax.prediction import (  # the forward passes, below the methods; re-exported here
    IMAGES_PER_CALL,  # noqa: F401
    check_logits,  # noqa: F401
    nonfinite_error,
    nonfinite_rows,
    predict,
    predict_logits,  # noqa: F401
)
from camu_jax.results import METRIC_KEYS  # What `score` returns, in its order.


def _acc(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(100.0 * np.mean(pred == labels)) if labels.size else float("nan")


def reference_accuracies(
    *,
    train_logits: np.ndarray,
    train_labels: np.ndarray,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    splits: Splits,
    forget_classes: tuple[int, ...] | None,
) -> dict[str, float]:
    """The reference's five accuracies, in percent.

    remain_train_acc (D_r), forget_train_acc (D_f), test_acc (all test), test_remain_acc and
    test_forget_acc (test items outside / inside the forgotten classes; for random removal,
    where no class is forgotten, the first is the plain test accuracy and the second NaN).
    """
    train_pred = train_logits.argmax(-1)
    test_pred = test_logits.argmax(-1)
    out = {
        "remain_train_acc": _acc(train_pred[splits.remain], train_labels[splits.remain]),
        "forget_train_acc": _acc(train_pred[splits.forget], train_labels[splits.forget]),
        "test_acc": _acc(test_pred, test_labels),
    }
    if forget_classes:
        in_forget = np.isin(test_labels, forget_classes)
        out["test_remain_acc"] = _acc(test_pred[~in_forget], test_labels[~in_forget])
        out["test_forget_acc"] = _acc(test_pred[in_forget], test_labels[in_forget])
    else:
        out["test_remain_acc"] = out["test_acc"]
        out["test_forget_acc"] = float("nan")
    return out


def score(
    *,
    train_logits: np.ndarray,
    train_labels: np.ndarray,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    splits: Splits,
    forget_classes: tuple[int, ...] | None,
    seed: int,
) -> dict[str, float]:
    """Every metric of one model from its logits (host arrays): the reference's accuracies,
    its MIA, SalUn's UA/RA/TA/MIA-efficacy and the loss attack (NaN where the set sizes
    cannot support an attack: `metrics.inapplicable_attacks`). Pure and picklable, so a
    population's members are scored in parallel processes."""
    y_tr, y_te = train_labels, test_labels
    skip = metrics.inapplicable_attacks(
        n_forget=splits.forget.size,
        n_sample=splits.sample.size,
        n_remain=splits.remain.size,
        n_test=len(y_te),
    )

    def attack(fn, **kwargs):  # An attack the set sizes cannot support is NaN (null).
        return float("nan") if fn.__name__ in skip else fn(**kwargs)

    out = reference_accuracies(
        train_logits=train_logits,
        train_labels=y_tr,
        test_logits=test_logits,
        test_labels=y_te,
        splits=splits,
        forget_classes=forget_classes,
    )
    p_tr, p_te = metrics.softmax(logits=train_logits), metrics.softmax(logits=test_logits)
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
            probs_or_logits=train_logits[splits.forget],
            labels=y_tr[splits.forget],
            from_logits=True,
        ),
        test_losses=metrics.per_example_cross_entropy(
            probs_or_logits=test_logits, labels=y_te, from_logits=True
        ),
        seed=seed,
    )
    return out


# The scoring workers' executor, once started (`stop_workers`).
_EXECUTOR = None


def _executor(workers: int):
    from joblib.externals.loky import get_reusable_executor

    global _EXECUTOR
    _EXECUTOR = get_reusable_executor(
        max_workers=workers, initializer=exec, initargs=(_DIE_WITH_PARENT, {"parent": os.getpid()})
    )
    return _EXECUTOR


# The scoring workers' initializer: a worker ends within a second of the process that started
# it, however that one ended (loky's own workers outlive a killed parent for half an hour).
# `exec` of this constant, so that the worker runs it before it imports anything else: a
# function of this module would first import jax, seconds during which a worker would not
# notice its parent's death. Ctrl-C reaches the whole process group; stopping is the parent's
# decision (`stop_workers`), so the workers ignore it.
_DIE_WITH_PARENT = """
import os, signal, threading, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
def watch():
    while os.getppid() == parent:
        time.sleep(0.25)
    os._exit(1)
threading.Thread(target=watch, name="camu-jax-parent-watch", daemon=True).start()
"""


def stop_workers() -> None:
    """Ends the scoring worker processes now; scores they were computing are lost. For a run
    being stopped (a signal); callable from any thread."""
    if _EXECUTOR is not None:
        _EXECUTOR.shutdown(wait=False, kill_workers=True)


def default_workers() -> int:
    """Host processes for scoring members in parallel: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class Scores:
    """Per-model metric dicts being computed: `result()` waits for them, gathers every
    process's (`jax.distributed`) and returns them all, in order. Scoring runs in worker
    processes while the caller goes on (e.g. trains the next phase on the device); with one
    worker it has already run in this process."""

    def __init__(
        self, items, order, owners, count, ready: bool, unscored=None, progress=False, desc=""
    ):
        self._items, self._order, self._owners = items, order, owners
        self._count, self._ready, self._table = count, ready, None
        self._progress, self._desc = progress, desc
        # {model index: why it has no scores}: the same on every process.
        self.unscored: dict[int, str] = dict(unscored or {})

    def result(self) -> list[dict[str, float] | None]:
        """Every model's metrics, in order; None for the models in `unscored`."""
        if self._table is None:
            items = self._items
            if not self._ready:
                with _bar(len(items), self._desc, self._progress) as bar:
                    items = [_waited(f, bar) for f in items]
            rows = {i: _metric_vector(s) for i, s in zip(self._order, items, strict=True)}
            size = len(self._owners)
            owners = [self._owners[i % size] for i in range(self._count)]
            self._table = sharding.gather_rows(rows, owners, len(METRIC_KEYS))
        return [
            None if i in self.unscored else dict(zip(METRIC_KEYS, map(float, row), strict=True))
            for i, row in enumerate(self._table)
        ]


def evaluate(
    model: nn.Module,
    variables: Sequence[dict],
    *,
    train: DeviceData,
    test: DeviceData,
    splits: Sequence[Splits],
    forget_classes: Sequence[tuple[int, ...] | None],
    seeds: Sequence[int],
    names: Sequence[str] | None = None,
    population_size: int | None = None,
    workers: int | None = None,
    wait: bool = True,
    skip_nonfinite: bool = False,
    progress: bool = False,
    desc: str = "evaluation",
):
    """`score` for every model `variables[i]` on its run's splits.

    Forward passes run `population_size` models at a time (default all, on as many devices as
    there are models, `engine.place`; a forward pass's
    activations are bounded by `IMAGES_PER_CALL` whatever the count) in one batched device pass
    over train and test images; the attacks of different models are fitted in `workers`
    parallel processes (default: the usable cores; 1 scores in this process). The values do
    not depend on `workers`, and on `population_size` only through float32 rounding of the
    logits (`_forward`). Raises FloatingPointError naming `names[i]` when a model's
    logits are not finite (before returning, whether or not `wait`); with `skip_nonfinite`,
    such a model, and a `None` in `variables` (a run that diverged), get no scores: `None` in
    the result, the reason in `Scores.unscored`.

    Across processes (`jax.distributed`), each process scores the models it owns
    (`sharding.member_owners`) from the logits it holds, and every process gets every score.

    `progress`: a progress bar `desc` over the models' scoring (on process 0), where it is
    waited for (here with one worker or `wait`, else in `Scores.result()`).

    Returns the list of metric dicts, or with `wait=False` a `Scores` whose `result()` gives
    it, so that the host fits attacks while the device goes on (every process must then call
    `result()`, in the same order: it gathers across processes).
    """
    check_image_sizes(train, test)
    check_splits(splits, train, data_name="train")
    check_model_classes(model, ("train", train), ("test", test))
    count = len(variables)
    placement = engine.place(population_size, count, train.mesh, what="evaluation")
    train, test, mesh, size = (
        train.on(placement.mesh),
        test.on(placement.mesh),
        placement.mesh,
        placement.size,
    )
    owners = sharding.member_owners(mesh, size)
    both = train.joined(test)
    jobs = {}
    unscored = {i: "no model (it diverged)" for i, v in enumerate(variables) if v is None}
    if unscored and not skip_nonfinite:
        raise ValueError(f"variables {sorted(unscored)} are None")
    present = [v for v in variables if v is not None]
    if not present:
        return Scores([], [], owners, count, ready=True, unscored=unscored)
    # A missing model's slot computes a present one's logits, which are then dropped.
    variables = [present[0] if v is None else v for v in variables]
    for lo in range(0, count, size):
        wave = list(variables[lo : lo + size])
        wave += [wave[0]] * (size - len(wave))
        stacked = sharding.shard_members(engine.stack(wave), mesh)
        # One pass over train and test images together: one program, not one per split; each
        # process fetches the logits of its own models only.
        if jax.process_count() == 1:  # every member is this process's, fetched to the host
            out = dict(enumerate(predict(model, stacked, both)))
        else:
            out = sharding.owned_members(predict(model, stacked, both, fetch=False), mesh)
        real = min(size, count - lo)
        checks = {}
        for j in (j for j in out if j < real and lo + j not in unscored):
            i = lo + j
            tr, te = out[j][: train.size], out[j][train.size : both.size]
            checks[j] = np.asarray([*nonfinite_rows(tr), *nonfinite_rows(te)], np.float64)
            jobs[i] = dict(
                train_logits=tr,
                train_labels=train.host_labels,
                test_logits=te,
                test_labels=test.host_labels,
                splits=splits[i],
                forget_classes=forget_classes[i],
                seed=seeds[i],
            )
        # Every process raises the same error, for the first bad model of the wave.
        bad = sharding.gather_rows(checks, owners, 4)
        for j in (j for j in range(real) if lo + j not in unscored):
            for k, total in ((0, train.size), (2, test.size)):
                if bad[j, k] > 0:
                    name = names[lo + j] if names else f"model {lo + j}"
                    error = nonfinite_error(
                        name, int(bad[j, k]), total, int(bad[j, k + 1]), variables[lo + j]
                    )
                    if not skip_nonfinite:
                        raise error
                    unscored[lo + j] = str(error)
                    jobs.pop(lo + j, None)
                    break
    order = sorted(jobs)
    workers = min(workers or default_workers(), len(order))
    progress = progress and jax.process_index() == 0
    if workers <= 1:
        with _bar(len(order), desc, progress) as bar:
            done = [_scored(jobs[i], bar) for i in order]
        scores = Scores(done, order, owners, count, ready=True, unscored=unscored)
    else:
        executor = _executor(workers)
        futures = [executor.submit(score, **jobs[i]) for i in order]
        scores = Scores(
            futures, order, owners, count, False, unscored, progress=progress, desc=desc
        )
    return scores.result() if wait else scores


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="model", disable=not progress, leave=False)


def _scored(job: dict, bar) -> dict[str, float]:
    out = score(**job)
    bar.update()
    return out


def _waited(future, bar) -> dict[str, float]:
    out = future.result()
    bar.update()
    return out


def _metric_vector(scores: dict[str, float]) -> np.ndarray:
    if tuple(scores) != METRIC_KEYS:
        raise AssertionError(f"score returned {tuple(scores)}, expected {METRIC_KEYS}")
    return np.asarray([scores[k] for k in METRIC_KEYS], np.float64)
