"""camu-jax: Causal Machine Unlearning (CaMU, Shen et al., SDM 2024) and the field's unlearning
baselines in JAX/Flax, run as populations of runs on one loop engine.

The top level holds the study-level names: data and splits, training, CaMU's entry points and
config, every method (`camu_jax.methods`), evaluation, relearning, the study (`run_study`,
its `Run`s and checkpoint `Store`) and the comparison. The
pieces below them (steps, losses, states, forward passes, counterfactuals) are reached through
their modules: `camu_jax.methods.camu` (`camu_step`, `CamuState`...), `camu_jax.steps`,
`camu_jax.losses`, `camu_jax.prediction`, `camu_jax.counterfactual`, `camu_jax.models`.
`audit` runs the population audits (U-LiRA, KLOM, the NeurIPS 2023 epsilon score); their
pieces are in `camu_jax.audits`.
"""

from camu_jax import methods
from camu_jax.audits import audit
from camu_jax.compare import compare, table
from camu_jax.data import DeviceData, ForgetSpec, make_splits
from camu_jax.evaluation import evaluate, score
from camu_jax.methods.camu import (
    CamuCoefficients,
    CamuConfig,
    camu_preset,
    unlearn,
    unlearn_population,
)
from camu_jax.models import create_model, init_variables
from camu_jax.relearning import RelearnConfig, relearn
from camu_jax.study import Run, Store, run_study
from camu_jax.training import TrainConfig, train_model, train_population

__version__ = "0.2.0"

__all__ = [
    "CamuCoefficients",
    "CamuConfig",
    "DeviceData",
    "ForgetSpec",
    "RelearnConfig",
    "Run",
    "Store",
    "TrainConfig",
    "audit",
    "camu_preset",
    "compare",
    "create_model",
    "evaluate",
    "init_variables",
    "make_splits",
    "methods",
    "relearn",
    "run_study",
    "score",
    "table",
    "train_model",
    "train_population",
    "unlearn",
    "unlearn_population",
]
