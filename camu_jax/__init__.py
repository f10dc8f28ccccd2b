"""camu-jax: Causal Machine Unlearning (CaMU, Shen et al., SDM 2024) and the field's unlearning
baselines in JAX/Flax, run as populations of runs on one loop engine."""

from camu_jax import methods
from camu_jax.compare import compare, table
from camu_jax.counterfactual import Counterfactuals, counterfactual_inputs, make_counterfactuals
from camu_jax.data import DeviceData, ForgetSpec, make_splits
from camu_jax.evaluation import evaluate, predict, predict_logits, score
from camu_jax.losses import cross_entropy_mean, kl_sum, output_loss, representation_loss
from camu_jax.models import apply_model, init_variables
from camu_jax.relearning import RelearnConfig, relearn
from camu_jax.steps import (
    CamuCoefficients,
    CamuState,
    TrainState,
    adam_l2,
    camu_step,
    init_camu_state,
    init_train_state,
    train_step,
)
from camu_jax.training import TrainConfig, train_model, train_population
from camu_jax.unlearning import CamuConfig, camu_preset, unlearn, unlearn_population

__version__ = "0.2.0"

__all__ = [
    "CamuCoefficients",
    "CamuConfig",
    "CamuState",
    "Counterfactuals",
    "DeviceData",
    "ForgetSpec",
    "RelearnConfig",
    "TrainConfig",
    "TrainState",
    "adam_l2",
    "apply_model",
    "camu_preset",
    "camu_step",
    "compare",
    "counterfactual_inputs",
    "cross_entropy_mean",
    "evaluate",
    "init_camu_state",
    "init_train_state",
    "init_variables",
    "kl_sum",
    "make_counterfactuals",
    "make_splits",
    "methods",
    "output_loss",
    "predict",
    "predict_logits",
    "relearn",
    "representation_loss",
    "score",
    "table",
    "train_model",
    "train_population",
    "train_step",
    "unlearn",
    "unlearn_population",
]
