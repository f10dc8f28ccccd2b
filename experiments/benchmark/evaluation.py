"""One accuracy pass over the test images: PyTorch at batch 32 as the reference, JAX with the
library's `predict_logits` (one model, batches of 1 024)."""

from __future__ import annotations

import time

import numpy as np

from .data import NUM_CLASSES
from .env import sync_torch, torch_device
from .timing import CompileTimer, alternate, median

# `camu_jax.evaluation.predict`'s batch for a population of one model.
JAX_EVAL_BATCH = 1024


def bench_eval(data, variables, state_dict, *, repeats: int) -> dict:
    from camu_jax import sharding
    from camu_jax.data.pipeline import DeviceData, InputSpec
    from camu_jax.models import create_model
    from camu_jax.prediction import predict_logits

    from ..pytorch_reference import data as tdata
    from ..pytorch_reference import evaluate, models

    model = create_model("cnn", num_classes=NUM_CLASSES)
    labels = data["test_labels"]
    test = DeviceData.put(data["test_images"], labels, spec=InputSpec(), mesh=sharding.make_mesh())
    device = torch_device()
    module = models.CNN(num_classes=NUM_CLASSES)
    module.load_state_dict(state_dict)
    module.to(device)
    test_set = tdata.tensor_dataset(data["test_images"], labels)

    def jax_accuracy() -> float:
        return float(np.mean(predict_logits(model, variables, test).argmax(-1) == labels))

    def jax_eval() -> float:
        start = time.perf_counter()
        jax_accuracy()
        return time.perf_counter() - start

    def torch_eval() -> float:
        start = time.perf_counter()
        evaluate.accuracy(module, test_set, batch_size=32, device=device)
        sync_torch(device)
        return time.perf_counter() - start

    timer = CompileTimer()
    with timer.measure():
        first = jax_eval()
    torch_eval()
    times = alternate({"jax": jax_eval, "torch": torch_eval}, repeats)
    return {
        "jax_s": median(times["jax"]),
        "torch_s": median(times["torch"]),
        "speedup": median(times["torch"]) / median(times["jax"]),
        "jax_compile_s": timer.total,
        "jax_first_call_s": first,
        "jax_batch": JAX_EVAL_BATCH,
        "torch_batch": 32,
        "examples": int(labels.size),
        "accuracy_jax": jax_accuracy(),
        "accuracy_torch": evaluate.accuracy(module, test_set, batch_size=32, device=device) / 100,
        "repeats": repeats,
    }
