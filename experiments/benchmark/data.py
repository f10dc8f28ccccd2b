"""The data and weights the step, end-to-end, evaluation and memory benchmarks share."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The scripts' package: `experiments` in a checkout, `camu_jax.experiments` installed.
EXPERIMENTS = __package__.rpartition(".")[0]
# The checkout (subprocesses run from here); installed, the working directory.
ROOT = Path(__file__).resolve().parents[2] if EXPERIMENTS == "experiments" else Path.cwd()
NUM_CLASSES = 10
MNIST_SHAPE = (28, 28, 1)
MNIST_TRAIN, MNIST_TEST, MNIST_CLASS0 = 60000, 10000, 5923
DEFAULT_MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
# The reference's MNIST presets (camu_reference.md, section 4).
PRESETS = {
    "mnist_class": {"epochs": 2, "impair_lr": 1e-3, "kl_lr": 4e-4},
    "mnist_random": {"epochs": 10, "impair_lr": 5e-4, "kl_lr": 4e-4},
}


def load_mnist(mnist_dir: Path | None, synthetic: bool, seed: int = 0) -> dict:
    """uint8 `[N, 28, 28, 1]` images and int labels; real MNIST unless `synthetic` or absent."""
    if not synthetic and mnist_dir is not None and mnist_dir.is_dir():
        try:
            from camu_jax.data.builders import read_idx

            return {
                "train_images": read_idx(mnist_dir / "train-images-idx3-ubyte.gz")[..., None],
                "train_labels": read_idx(mnist_dir / "train-labels-idx1-ubyte.gz").astype(np.int32),
                "test_images": read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")[..., None],
                "test_labels": read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz").astype(np.int32),
                "data": "mnist",
            }
        except (OSError, ValueError, ImportError) as err:
            print(f"[benchmark] could not read MNIST from {mnist_dir} ({err}); using synthetic")
    rng = np.random.default_rng(seed)
    # As many class-0 items as MNIST has (5923), so both presets have MNIST's sizes.
    labels = np.concatenate(
        [np.zeros(MNIST_CLASS0, np.int32), rng.integers(1, NUM_CLASSES, MNIST_TRAIN - MNIST_CLASS0)]
    )
    return {
        "train_images": rng.integers(0, 256, (MNIST_TRAIN, *MNIST_SHAPE), dtype=np.uint8),
        "train_labels": rng.permutation(labels).astype(np.int32),
        "test_images": rng.integers(0, 256, (MNIST_TEST, *MNIST_SHAPE), dtype=np.uint8),
        "test_labels": rng.integers(0, NUM_CLASSES, MNIST_TEST).astype(np.int32),
        "data": "synthetic",
    }


def make_splits(labels, preset: str, seed: int = 0):
    """The splits of a reference preset: class 0, or a random 10 %."""
    from camu_jax.data.splits import ForgetSpec
    from camu_jax.data.splits import make_splits as _make

    spec = (
        ForgetSpec(kind="class", classes=(0,))
        if preset == "mnist_class"
        else ForgetSpec(kind="random", fraction=0.1)
    )
    return _make(labels, spec, seed=seed, num_classes=NUM_CLASSES)


def original_weights(seed: int = 0):
    """The same random CNN for both sides (speed does not depend on the weights' values):
    `(flax variables, torch state_dict)`."""
    import jax

    from camu_jax.models import create_model, init_variables

    from ..pytorch_reference import models
    from ..pytorch_reference.convert import flax_to_torch

    variables = init_variables(
        create_model("cnn", num_classes=NUM_CLASSES), jax.random.key(seed), MNIST_SHAPE
    )
    module = models.CNN(num_classes=NUM_CLASSES)
    flax_to_torch(variables, module)
    return variables, module.state_dict()
