"""camu-jax: Causal Machine Unlearning (CaMU, Shen et al., SDM 2024) in JAX/Flax."""

from camu_jax.counterfactual import Counterfactuals, counterfactual_inputs, make_counterfactuals
from camu_jax.losses import cross_entropy_mean, kl_sum, output_loss, representation_loss
from camu_jax.steps import (
    CamuCoefficients,
    CamuState,
    TrainState,
    adam_l2,
    camu_step,
    eval_step,
    init_camu_state,
    init_train_state,
    init_variables,
    train_step,
)
from camu_jax.unlearning import CamuConfig, camu_preset, unlearn

__version__ = "0.1.0"

__all__ = [
    "CamuCoefficients",
    "CamuConfig",
    "CamuState",
    "Counterfactuals",
    "TrainState",
    "adam_l2",
    "camu_preset",
    "camu_step",
    "counterfactual_inputs",
    "cross_entropy_mean",
    "eval_step",
    "init_camu_state",
    "init_train_state",
    "init_variables",
    "kl_sum",
    "make_counterfactuals",
    "output_loss",
    "representation_loss",
    "train_step",
    "unlearn",
]
