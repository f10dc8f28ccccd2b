"""Data: TFDS builders (stable `index`), loading into arrays, splits, the input pipeline."""

from camu_jax.data.builders import DataSourceError
from camu_jax.data.loading import SUPPORTED_DATASETS, Dataset, load_dataset
from camu_jax.data.pipeline import DeviceData, InputSpec, input_spec_for, preprocess
from camu_jax.data.splits import ForgetSpec, Splits, cifar100_class_spec, make_splits

__all__ = [
    "SUPPORTED_DATASETS",
    "DataSourceError",
    "Dataset",
    "DeviceData",
    "ForgetSpec",
    "InputSpec",
    "Splits",
    "cifar100_class_spec",
    "input_spec_for",
    "load_dataset",
    "make_splits",
    "preprocess",
]
