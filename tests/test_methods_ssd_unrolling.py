"""SSD and Unrolling SGD (`camu_jax.methods.ssd`, `camu_jax.methods.unrolling`).

In-process (float32, digits, two originals of 5 epochs forgetting classes 0 and 3): each method
moves forget accuracy down and keeps remaining-class test accuracy; SSD leaves every parameter
below its selection threshold bit-identical and scales the others by its rule.

In a float64 subprocess (`tests/multidevice/population_ssd_unrolling.py`): a population member
equals its run alone (all together, and in waves of two), SSD's importances equal the official
`calc_importance` loop, and Unrolling's update equals its formula. Tolerances, derived as in
tests/test_population.py: one float64 sum of n terms errs by at most n * eps64 * G (eps64 =
2**-52, G <= 10 the largest gradient magnitude, checked below for the batch gradients); the
longest reductions are n <= 64 * 64 = 4096 terms for SSD's batches of 64 (a batch times the
CNN's 8x8 maps), n <= 2048 for Unrolling's batches of 32, so

* a batch-mean gradient element errs by <= DELTA_G64 = 4096 * eps64 * 10 ~ 9.1e-12 (SSD); its
  square by <= 2 G DELTA_G64 + DELTA_G64**2 ~ 1.9e-10; an importance, a mean of such squares
  (plus <= 23 batches * eps64 * G**2 ~ 5e-13 of its own rounding), by <= DELTA_I = 2e-10; two
  programs' importances differ by <= 2 DELTA_I.
* SSD's parameter: where `|I_f - alpha I_D| <= 2 DELTA_I (1 + alpha)` the selection itself may
  differ, so only `|d theta| <= |theta_0|` holds (both results lie between 0 and theta_0);
  elsewhere an unselected parameter is theta_0 in both (exact), a selected one is theta_0 * w
  with w = min(lam I_D / I_f, 1) moved by at most its range over the importances' error
  intervals, plus 4 roundings.
* Unrolling's step adds scale * (sum of <= 32 items' gradients at theta_0): <= scale * 32 *
  DELTA_G32 (DELTA_G32 = 2048 * eps64 * 10) per step, plus the addition's rounding (eps64 times
  the parameter magnitude); K steps, K times that, and two programs differ by twice it. The
  one-shot formula sums all |D_f| items' gradients in one reduction of |D_f| * 64 terms of size
  <= |D_f| * G.
"""

from pathlib import Path

import jax
import numpy as np
import pytest

from camu_jax import methods, sharding
from camu_jax.data import ForgetSpec, input_spec_for, load_dataset, make_splits
from camu_jax.data.pipeline import DeviceData
from camu_jax.methods.ssd import SSD, SSDWithImportances
from camu_jax.methods.unrolling import UnrollingSGD
from camu_jax.models import create_model, init_variables
from camu_jax.prediction import predict
from camu_jax.training import TrainConfig, train_population

ROOT = Path(__file__).resolve().parents[1]
EPS64 = 2.0**-52
G = 10.0
DELTA_G64 = 4096 * EPS64 * G
DELTA_G32 = 2048 * EPS64 * G
DELTA_I = 2e-10
SEEDS = (0, 1)
CLASSES = (0, 3)
# A class-removal unlearning must leave most of D_f misclassified (the retrained model gets ~0 %
# of it): forget train accuracy at least this many points below the original's.
FORGET_DROP = 50.0
# digits' test split keeps ~324 images outside the forgotten class: at ~90 % accuracy the
# binomial standard error is sqrt(0.9 * 0.1 / 324) ~ 1.7 points, so 10 points (~6 standard
# errors) below the original is damage, not noise; a one-shot edit may cost a few points.
REMAIN_DROP = 10.0


# ------------------------------------------------------------------ float64 subprocess


@pytest.fixture(scope="module")
def f64(tmp_path_factory, run_script):
    npz = tmp_path_factory.mktemp("ssd") / "ssd.npz"
    return run_script("population_ssd_unrolling.py", npz), dict(np.load(npz))


def ssd_bound(theta0, i_f, i_d, alpha, lam, delta):
    """Elementwise bound on |theta - theta'| of two SSD results whose importances differ by at
    most `delta` (module docstring)."""
    margin = np.abs(i_f - alpha * i_d) <= delta * (1 + alpha)
    selected = i_f > alpha * i_d
    safe = np.where(selected, i_f, 1.0)
    w = np.minimum(lam * i_d / safe, 1.0)
    lo = np.minimum(lam * np.maximum(i_d - delta, 0.0) / (safe + delta), 1.0)
    hi = np.minimum(lam * (i_d + delta) / np.maximum(safe - delta, np.finfo(float).tiny), 1.0)
    dw = np.maximum(hi - w, w - lo)
    a = np.abs(theta0)
    return np.where(margin, a, np.where(selected, a * (dw + 4 * EPS64), 0.0)), margin, selected


@pytest.mark.parametrize("mode", ["population", "two_waves"])
def test_ssd_member_equals_sequential_float64(f64, mode):
    report, z = f64
    alpha, lam = report["ssd"]["alpha"], report["ssd"]["lam"]
    for i in range(len(report["forget_sizes"])):
        theta0 = z[f"original_{i}"]
        i_f, i_d = z[f"sequential_i_f_{i}"], z[f"sequential_i_d_{i}"]
        seq = z[f"sequential_params_{i}"]
        for key in ("i_f", "i_d"):
            assert (
                np.max(np.abs(z[f"{mode}_{key}_{i}"] - z[f"sequential_{key}_{i}"])) <= 2 * DELTA_I
            )
        bound, margin, selected = ssd_bound(theta0, i_f, i_d, alpha, lam, 2 * DELTA_I)
        diff = np.abs(z[f"{mode}_params_{i}"] - seq)
        assert np.all(diff <= bound), (i, float(np.max(diff - bound)))
        # Not vacuous: SSD moves its selected parameters far beyond their bounds (a selected
        # parameter with I_f barely above the margin has a wide w interval, so compare the
        # typical one and the most moved one).
        assert selected.any() and not selected.all()
        moved = np.abs(seq - theta0)
        typical = selected & ~margin
        assert np.median(moved[typical]) > 1000 * np.median(bound[typical])
        k = np.argmax(moved)
        assert moved[k] > 1000 * bound[k]


def test_ssd_importances_equal_the_official_loop(f64):
    report, z = f64
    ref = report["ssd"]["reference"]
    assert ref["i_f"] <= 2 * DELTA_I and ref["i_d"] <= 2 * DELTA_I, ref
    # The derivation's G bounds every batch gradient: g**2 <= (sum of squares) = I * batches.
    n_f = -(-report["forget_sizes"][0] // 64)
    n_d = n_f + -(-report["remain_sizes"][0] // 64)
    assert np.sqrt(np.max(z["sequential_i_f_0"]) * n_f) <= G
    assert np.sqrt(np.max(z["sequential_i_d_0"]) * n_d) <= G


@pytest.mark.parametrize("mode", ["population", "two_waves"])
def test_unrolling_member_equals_sequential_float64(f64, mode):
    report, _ = f64
    u = report["unrolling"]
    for i, diff in enumerate(u["modes"][mode]):
        per_step = u["scale"] * 32 * DELTA_G32 + EPS64 * (u["param_scale"][i] + u["moved"][i])
        bound = 2 * u["steps"][i] * per_step
        assert diff <= bound, (i, diff, bound)
        assert u["moved"][i] > 1000 * bound


def test_unrolling_update_is_the_papers_formula(f64):
    report, _ = f64
    u = report["unrolling"]
    for i, diff in enumerate(u["formula"]):
        n = u["forget_sizes"][i]
        own = u["steps"][i] * (
            u["scale"] * 32 * DELTA_G32 + EPS64 * (u["param_scale"][i] + u["moved"][i])
        )
        one_shot = u["scale"] * (n * 64) * EPS64 * n * G + EPS64 * u["moved"][i]
        assert diff <= own + one_shot, (i, diff)


# ------------------------------------------------------------------ float32, in process


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits", progress=False)
    mesh = sharding.make_mesh()
    spec = input_spec_for("digits", "cnn")
    train = DeviceData.put(d.train_images, d.train_labels, spec=spec, mesh=mesh)
    test = DeviceData.put(d.test_images, d.test_labels, spec=spec, mesh=mesh)
    model = create_model("cnn", num_classes=10)
    originals = [
        jax.tree.map(np.asarray, v)
        for v, _ in train_population(
            model,
            [init_variables(model, jax.random.key(s), train.input_shape) for s in SEEDS],
            data=train,
            items=[np.arange(d.train_labels.size)] * len(SEEDS),
            seeds=SEEDS,
            config=TrainConfig(epochs=5),
            progress=False,
        )
    ]
    splits = [
        make_splits(d.train_labels, ForgetSpec(kind="class", classes=(c,)), seed=s, num_classes=10)
        for s, c in zip(SEEDS, CLASSES, strict=True)
    ]

    def accuracies(variables):
        """Per member: (forget train accuracy, remaining-class test accuracy), in %."""
        stacked = sharding.shard_members(
            jax.tree.map(lambda *x: np.stack([np.asarray(a) for a in x]), *variables), mesh
        )
        tr, te = predict(model, stacked, train), predict(model, stacked, test)
        out = []
        for j, (sp, c) in enumerate(zip(splits, CLASSES, strict=True)):
            keep = d.test_labels != c
            forget = np.mean(tr[j][sp.forget].argmax(-1) == d.train_labels[sp.forget])
            remain = np.mean(te[j][keep].argmax(-1) == d.test_labels[keep])
            out.append((100 * forget, 100 * remain))
        return out

    def run(method):
        return methods.run_population(
            method,
            model,
            originals,
            data=train,
            splits=splits,
            seeds=list(SEEDS),
            num_classes=10,
            progress=False,
        )

    return {"originals": originals, "accuracies": accuracies, "run": run}


def check_direction(digits, results):
    before = digits["accuracies"](digits["originals"])
    after = digits["accuracies"]([v for v, _ in results])
    for (f0, r0), (f1, r1) in zip(before, after, strict=True):
        assert f1 <= f0 - FORGET_DROP, (before, after)
        assert r1 >= r0 - REMAIN_DROP, (before, after)


def test_ssd_forgets_the_class_and_keeps_the_rest(digits):
    # alpha 1: a class of digits is ~10 % of D, and I_D holds D_f's own batches, so no
    # parameter can have I_f > alpha * I_D for alpha >= ~10 (docs/methods.md, "SSD").
    check_direction(digits, digits["run"](SSD(alpha=1.0, lam=1.0)))


def test_unrolling_forgets_the_class_and_keeps_the_rest(digits):
    check_direction(digits, digits["run"](UnrollingSGD(learning_rate=0.04, original_epochs=5)))


def test_ssd_leaves_parameters_below_its_selection_threshold_untouched(digits):
    # lam < 1: an implementation scaling every parameter by min(lam I_D / I_f, 1) would also
    # shrink unselected ones with I_D / I_f < 1 / lam.
    alpha, lam = 1.0, 0.1
    results = digits["run"](SSDWithImportances(alpha=alpha, lam=lam))
    for original, (out, _) in zip(digits["originals"], results, strict=True):
        flat = [jax.tree.leaves(t) for t in (original["params"], out["params"])]
        flat += [jax.tree.leaves(out[k]) for k in ("i_f", "i_d")]
        counts = np.zeros(2, int)
        for theta0, theta, i_f, i_d in zip(*flat, strict=True):
            theta0, theta = np.asarray(theta0), np.asarray(theta)
            selected = np.asarray(i_f) > np.asarray(i_d) * np.float32(alpha)
            np.testing.assert_array_equal(theta[~selected], theta0[~selected])
            w = np.minimum(np.float32(lam) * i_d[selected] / i_f[selected], np.float32(1))
            # Two float32 roundings (the ratio, the product) on either side: 4 ulps.
            np.testing.assert_allclose(theta[selected], theta0[selected] * w, rtol=4 * 2.0**-23)
            counts += [selected.sum(), (~selected).sum()]
        assert counts.min() > 0, counts  # both branches really exercised


def test_registry_and_validation():
    assert methods.get("ssd") == SSD() and methods.get("unrolling") == UnrollingSGD()
    with pytest.raises(ValueError, match="alpha.*-1"):
        methods.get("ssd", alpha=-1.0).validate()
    with pytest.raises(ValueError, match="original_epochs.*2.5"):
        methods.get("unrolling", original_epochs=2.5).validate()
