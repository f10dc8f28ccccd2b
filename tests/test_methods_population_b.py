"""A population member of boundary shrink / expand, UNSIR, Bad Teacher and SCRUB computes its
sequential run (float64, own process: tests/multidevice/methods_population_b.py).

Tolerance, derived as in tests/test_population.py: the population and the sequential program
differ only in summation order (one grouped or patch-matmul convolution over the members
instead of one convolution per run). One float64 sum of n terms errs by at most
n * eps64 * sum|terms| (eps64 = 2**-52). The longest reductions are the weight gradients of
conv1: a batch of b items times digits' 8x8 = 64 output positions, n = 64 b; with G the largest
gradient magnitude (<= 10 for these losses) a gradient element errs by at most
g(b) = 64 b * eps64 * G.

* SGD with momentum m (boundary shrink / expand, SCRUB): the momentum buffer sums past
  gradients with weights m^k, so its error is at most g / (1 - m), and an update's lr times
  that; K steps: K * lr * g / (1 - m).
* Adam (Bad Teacher, UNSIR): it divides by sqrt(v) + 1e-8, so an update errs by at most
  lr * g / 1e-8 per step; K steps: K * lr * g / 1e-8 (UNSIR: the larger of its two rates).
* UNSIR's noise (Adam on the inputs, `noise_steps` steps at `noise_lr`, batch `noise_size`)
  errs by at most noise_steps * noise_lr * g(noise_size) / 1e-8; it then enters the impair
  steps as inputs, which in practice agree to rounding level, i.e. one more rounding of the
  inputs inside the budget above.

The bound neglects how a parameter difference feeds back into later gradients (first order in
the rounding error; the runs are a few dozen steps). Every member moves at least 100x the
bound, so the bound still tells a member that saw another member's data (a difference of
order lr per step) from one that did not.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EPS64 = 2.0**-52
G = 10.0
POSITIONS = 64  # digits CNN: conv1's 8x8 output positions per item
ADAM_EPS = 1e-8


def gradient_error(batch: int) -> float:
    return POSITIONS * batch * EPS64 * G


def bound(name: str, config: dict, steps: int) -> float:
    if name in ("boundary_shrink", "boundary_expand"):
        g = gradient_error(config["batch_size"])
        return steps * config["learning_rate"] * g / (1 - config["momentum"])
    if name == "scrub":
        rb = config["batch_size"]
        width = -(-max(config["forget_batch_size"], rb) // rb) * rb  # the merged batch
        return steps * config["learning_rate"] * gradient_error(width) / (1 - config["momentum"])
    if name == "bad_teacher":
        return steps * config["learning_rate"] * gradient_error(config["batch_size"]) / ADAM_EPS
    if name == "unsir":
        lr = max(config["impair_lr"], config["repair_lr"])
        return steps * lr * gradient_error(config["batch_size"]) / ADAM_EPS
    raise KeyError(name)


METHODS = ["boundary_shrink", "boundary_expand", "unsir", "bad_teacher", "scrub"]


@pytest.fixture(scope="module")
def report(run_script):
    return run_script("methods_population_b.py")


@pytest.mark.parametrize("name", METHODS)
def test_member_equals_sequential_float64(report, name):
    r = report[name]
    for i, (d, steps) in enumerate(zip(r["diff"], r["steps"], strict=True)):
        tol = bound(name, r["config"], steps)
        assert d["abs"] <= tol, (name, i, d, tol)
        assert r["moved"][i]["abs"] > 100 * tol, (name, i, r["moved"][i], tol)


def test_unsir_noise_of_a_member_equals_its_own(report):
    c = report["unsir"]["config"]
    tol = c["noise_steps"] * c["noise_lr"] * gradient_error(c["noise_size"]) / ADAM_EPS
    assert max(report["unsir"]["noise_diff"]) <= tol


def test_members_differ_in_forget_set_size(report):
    # Different |D_f|, so shorter members really are padded (and left alone) at the end.
    assert len(set(report["forget_sizes"])) > 1
