r"""Does the estimate agree with the ELBO?  ELBO ≤ IWAE_10 ≤ … ≤ log p̂(x).

In expectation the chain always holds (Burda et al., 2016, theorem 1). Two checks
guard it, each at 3 Monte Carlo standard errors:

* **per datum**: a pair (IWAE_a, IWAE_b), a < b, is violated when
  IWAE_a - IWAE_b > 3·sqrt(se_a² + se_b²). Under a correct estimator this happens by
  chance for at most 0.135 % of data (a one-sided normal tail; less, since the two
  estimates share weights and so are positively correlated). The check fails when
  violations are more frequent than a binomial tail of 1e-6 allows;
* **on average**: the mean difference over data must not exceed 3 standard errors
  of that mean.

A violation is a bug, not bad luck: a flipped sign in a log-density, a site outside
the data plate, or a scale (subsampling) applied while evaluating. Non-finite
estimates fail too.
"""

from __future__ import annotations

import math

import torch

from pyro_vae.errors import PyroVAEError

__all__ = ["EstimatorConsistencyError", "check_consistency"]

_ROUNDING = 1e-8  # nats: float64 rounding between estimates from the same weights


class EstimatorConsistencyError(PyroVAEError):
    """The ELBO/IWAE/log p̂ chain is broken beyond Monte Carlo error."""


def _chance_allowance(n: int, rate: float = 0.00135) -> int:
    """Violations a correct estimator stays under except with probability ~1e-6."""
    mean = n * rate
    return math.ceil(mean + 5.0 * math.sqrt(mean) + 3.0)


def check_consistency(result: object, n_sigma: float = 3.0) -> dict[str, int]:
    """Raise :class:`EstimatorConsistencyError` if the chain breaks; else count.

    Args:
        result: a :class:`pyro_vae.evaluate.LogMarginal`.
        n_sigma: the threshold in standard errors.

    Returns:
        Per neighbouring pair ``"a<=b"`` of the chain ELBO, IWAE_10, ..., log p̂(x),
        how many data violated it (within the allowance).
    """
    if not torch.isfinite(result.log_px).all() or not torch.isfinite(result.elbo).all():
        raise EstimatorConsistencyError(
            "log p̂(x) or the ELBO is NaN or infinite for some data: the model or the "
            "guide gives non-finite log-densities (check likelihood support and scale "
            "floors)."
        )
    k = result.k
    chain = [("ELBO", result.elbo, result.elbo_se)]
    chain += [
        (f"IWAE_{g}", result.iwae[g], result.iwae_se[g]) for g in sorted(result.iwae)
    ]
    chain += [("log p̂(x)", result.log_px, result.log_px_se)]
    n, counts = len(result.log_px), {}
    for (a, va, sa), (b, vb, sb) in zip(chain[:-1], chain[1:], strict=True):
        diff = va - vb
        se = (sa.square() + sb.square()).sqrt()
        bad = int((diff > n_sigma * se + _ROUNDING).sum())
        mean_se = se.square().sum().sqrt().item() / n
        mean_diff = diff.mean().item()
        if mean_diff > n_sigma * mean_se + _ROUNDING or bad > _chance_allowance(n):
            raise EstimatorConsistencyError(
                f"{a} exceeds {b} (K = {k}): by {mean_diff:.4g} nats on average "
                f"({n_sigma:g} se = {n_sigma * mean_se:.3g}), and beyond "
                f"{n_sigma:g} se for {bad} of {n} data. The bounds must rise with k, "
                "so the importance weights are wrong: look for a flipped sign in a "
                "log-density, a sample site outside pyro.plate('data'), or a "
                "poutine.scale/subsample factor active during evaluation."
            )
        counts[f"{a}<={b}"] = bad
    return counts
