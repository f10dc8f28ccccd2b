"""Population audits of unlearning, from hundreds of models trained as one program.

* U-LiRA (Hayes et al. 2024, arXiv 2403.01218; LiRA, Carlini et al. 2022): a per-example
  likelihood-ratio attack between shadow models that trained on an example and unlearned it
  and shadow models that never saw it.
* KLOM (Georgiev et al. 2024, arXiv 2410.23232): per example, the KL divergence between the
  margins of unlearned models and of oracles retrained without the forget set.
* The NeurIPS 2023 unlearning challenge's epsilon score: per forget example, the (epsilon,
  delta) that threshold attacks between retrained and unlearned models certify, bucketed.

`audit` trains what the metrics need and scores methods (`camu_jax.audit` from a notebook,
`python -m experiments.audit` from the shell); `phi` is their one primitive, `metrics` the
device versions of the metrics, `reference` their numpy references from the official code,
`design` the shadow designs, `tables` the Markdown tables. docs/audits.md has an example.
"""

from camu_jax.audits.metrics import (
    attack_summary,
    epsilons,
    final_score,
    forget_score,
    klom,
    lira_scores,
)
from camu_jax.audits.phi import logit_scaled_confidence, population_phi
from camu_jax.audits.run import METRICS, AuditConfig, audit
from camu_jax.audits.tables import audit_tables

__all__ = [
    "METRICS",
    "AuditConfig",
    "attack_summary",
    "audit",
    "audit_tables",
    "epsilons",
    "final_score",
    "forget_score",
    "klom",
    "lira_scores",
    "logit_scaled_confidence",
    "population_phi",
]
