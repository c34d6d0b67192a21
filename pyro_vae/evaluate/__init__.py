"""Importance-sampled evaluation of any (model, guide) pair, per datum.

``log_weights`` gives log p(x, z) - log q(z|x) from Pyro traces; ``log_marginal``
turns K of them per datum into log p̂(x) with its standard error, the IWAE_k ladder
and PSIS diagnostics; ``check_consistency`` verifies ELBO ≤ IWAE_k ≤ log p̂(x).
Also: :mod:`.psis` (k̂ and ESS through ArviZ), :mod:`.latents` (MMD to the prior,
active units, mutual information), :mod:`.reference` (the pPCA model whose log p(x)
is known, for tests of the estimators).

The estimators only: this package imports torch, pyro, numpy, arviz,
:mod:`pyro_vae.losses` (the MMD kernel), :mod:`pyro_vae.errors`, :mod:`pyro_vae.rng`
and :mod:`pyro_vae.memory`; never :mod:`pyro_vae.models`, :mod:`pyro_vae.guides`,
training or the command line. Scoring a run directory, ``python -m pyro_vae.evaluate
RUN_DIR``, is the command line's (:mod:`pyro_vae.cli.evaluate`); this package's
``__main__`` only starts it.
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
