"""Importance-sampled evaluation of any (model, guide) pair, per datum.

``log_weights`` gives log p(x, z) - log q(z|x) from Pyro traces; ``log_marginal``
turns K of them per datum into log p̂(x) with its standard error, the IWAE_k ladder
and PSIS diagnostics; ``check_consistency`` verifies ELBO ≤ IWAE_k ≤ log p̂(x).
``python -m pyro_vae.evaluate RUN_DIR`` runs all of it on a trained run.

This package imports neither :mod:`pyro_vae.models` nor :mod:`pyro_vae.guides`
(its command line, ``__main__``, assembles a run through :mod:`pyro_vae.cli.loading`).
"""

from pyro_vae.evaluate.check import (
    EstimatorConsistencyError,
    check_against_pyro,
    check_consistency,
)
from pyro_vae.evaluate.marginal import (
    LogMarginal,
    iwae_grid,
    log_marginal,
    plan_particle_chunk,
)
from pyro_vae.evaluate.psis import KHAT_UNRELIABLE, psis_diagnostics
from pyro_vae.evaluate.weights import SiteContractError, log_weights

__all__ = [
    "KHAT_UNRELIABLE",
    "EstimatorConsistencyError",
    "LogMarginal",
    "SiteContractError",
    "check_against_pyro",
    "check_consistency",
    "iwae_grid",
    "log_marginal",
    "log_weights",
    "plan_particle_chunk",
    "psis_diagnostics",
]
