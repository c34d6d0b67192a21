r"""Pareto-smoothed importance sampling diagnostics, per datum, through ArviZ.

For each datum the K importance weights get a generalized-Pareto fit to their upper
tail (``arviz.psislw``). Its shape k̂ says how heavy the tail is: below 0.5 the
weights have finite variance and the estimate converges fast; between 0.5 and 0.7 it
converges, slowly; above 0.7 the importance-sampled log p̂(x) of that datum is not to
be trusted (Vehtari et al., 2024). The effective sample size is
ESS = 1 / Σ_k w̃_k² with the smoothed, self-normalized weights w̃.

References:
    Vehtari, Simpson, Gelman, Yao & Gabry (2024), Pareto smoothed importance
    sampling, JMLR 25(72).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["KHAT_UNRELIABLE", "psis_diagnostics"]

KHAT_UNRELIABLE = 0.7
_FLAT = 1e-9  # weights equal to this many nats have no tail to fit


def psis_diagnostics(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pareto k̂ and PSIS effective sample size for each datum.

    Args:
        log_w: log-weights ``(K, N)``.

    Returns:
        ``(khat, ess)``, each float64 ``(N,)`` on the CPU. Weights that are equal to
        within 1e-9 nats (an exact posterior as guide) have no tail: their k̂ is set
        to 0 and their ESS to K. Where the tail fit fails (too few samples, K below
        about 100) k̂ is inf, which counts as unreliable.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's refactor notice and k̂ warnings
        import arviz as az

        lw = log_w.detach().double().T.cpu().numpy()  # ArviZ wants samples last
        smoothed, khat = az.psislw(lw)
    ess = 1.0 / np.exp(_logsumexp(2.0 * smoothed))
    flat = (lw.max(axis=1) - lw.min(axis=1)) < _FLAT
    khat, ess = np.where(flat, 0.0, khat), np.where(flat, lw.shape[1], ess)
    return torch.from_numpy(khat), torch.from_numpy(ess)


def _logsumexp(a: np.ndarray) -> np.ndarray:
    top = a.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(a - top).sum(axis=1, keepdims=True)))[:, 0]
