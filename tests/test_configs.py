"""Config values are checked before anything runs, and every error names the bad value."""

import dataclasses

import pytest

from camu_jax.methods.camu import CamuCoefficients, CamuConfig
from experiments.configs import ExperimentConfig


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"epochs": 0}, "CaMU epochs must be a positive integer, got 0"),
        ({"epochs": -1}, "got -1"),
        ({"epochs": 2.5}, "got 2.5"),
        ({"batch_size": 0}, "CaMU batch_size must be a positive integer, got 0"),
        ({"kl_lr": float("nan")}, "CaMU kl_lr must be a positive finite number, got nan"),
        ({"kl_lr": 0.0}, "kl_lr"),
        ({"impair_lr": float("inf")}, "CaMU impair_lr must be a positive finite number, got inf"),
        ({"impair_lr": -1e-3}, "got -0.001"),
        ({"weight_decay": float("nan")}, "CaMU weight_decay must be a non-negative"),
        ({"coefficients": CamuCoefficients(rep_forget=-0.5)}, "rep_forget"),
        ({"coefficients": CamuCoefficients(out_sample=float("inf"))}, "out_sample"),
    ],
)
def test_bad_camu_config_names_the_value(change, needle):
    with pytest.raises(ValueError, match="CaMU") as e:
        dataclasses.replace(CamuConfig(), **change).validate()
    assert needle in str(e.value)


def test_good_camu_configs_pass():
    CamuConfig().validate()
    CamuConfig(weight_decay=0.0, coefficients=CamuCoefficients(out_forget=0.0)).validate()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"original_epochs": 0}, "original epochs must be a positive integer, got 0"),
        ({"batch_size": -4}, "batch size must be a positive integer, got -4"),
        ({"learning_rate": float("nan")}, "learning rate must be a positive finite number"),
        ({"weight_decay": float("-inf")}, "weight decay"),
        ({"relearn_every": 0}, "relearn every"),
        ({"seeds": (0, -1)}, "seed must be a non-negative integer, got -1"),
        ({"scenario": "random", "forget_fraction": float("nan")}, "fraction nan"),
        ({"scenario": "proportions", "forget_proportions": (0.5, float("nan"))}, "nan"),
        ({"scenario": "indices", "forget_indices": (1, 2.5)}, "got 2.5"),
        ({"camu": CamuConfig(epochs=-1)}, "CaMU epochs"),
        ({"camu": CamuConfig(batch_size=0)}, "CaMU batch_size"),
        # Method settings (`--set`): the method and the field are named.
        ({"methods": ("ft",), "method_settings": (("ft", "learning_rate", -1.0),)}, "ft lear"),
        ({"methods": ("ft",), "method_settings": (("ft", "epochs", float("nan")),)}, "epochs"),
        ({"method_settings": (("camu", "kl_lr", float("nan")),)}, "CaMU kl_lr"),
        ({"method_settings": (("camu", "rep_forget", -0.5),)}, "rep_forget"),
        ({"method_settings": (("ft", "lr", 0.1),)}, "ft has no setting 'lr'; its settings: "),
        ({"method_settings": (("fft", "epochs", 1),)}, "unknown method 'fft'; methods: camu, ft"),
        ({"method_settings": (("ft", "epochs", "3"),)}, "ft.epochs takes an integer, got '3'"),
        ({"method_settings": (("ft", "epochs", True),)}, "ft.epochs takes an integer"),
        ({"method_settings": (("ft", "epochs"),)}, "(method, field, value) triples"),
    ],
)
def test_bad_experiment_config_names_the_value(change, needle):
    with pytest.raises(ValueError) as e:
        dataclasses.replace(ExperimentConfig(), **change).validate()
    assert needle in str(e.value)
