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

When the IWAE groups nest (every k divides the next, as for K = 1000 or 5000), the
chain holds for any weights by Jensen's inequality, so these checks guard only the
bookkeeping (and non-nested grids, and non-finite values). What can catch wrong
weights is :func:`check_against_pyro`: the per-datum ELBO against Pyro's own
``Trace_ELBO``, a separate implementation with fresh draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.infer import Trace_ELBO

from pyro_vae.errors import PyroVAEError
from pyro_vae.rng import forked_rng

__all__ = ["EstimatorConsistencyError", "check_against_pyro", "check_consistency"]

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


@torch.no_grad()
def check_against_pyro(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    result: object,
    *,
    particles: int = 8,
    chunk: int = 100,
    n_sigma: float = 5.0,
    seed: int | None = None,
) -> dict[str, float]:
    """Compare the per-datum ELBO with Pyro's own ``Trace_ELBO`` on the same data.

    The chain ELBO ≤ IWAE_k ≤ log p̂(x) holds by Jensen's inequality for any positive
    weights when the groups nest, so it cannot expose a wrong weight. This check can:
    ``Trace_ELBO`` is a separate implementation with fresh draws, which sums over the
    batch, so a per-datum extraction that mixed data, dropped a site or flipped a
    sign in :func:`pyro_vae.evaluate.log_weights` disagrees with it. The mean ELBO
    per datum of the two must agree within ``n_sigma`` standard errors, and Pyro's
    ELBO must not exceed log p̂(x) by more than that.

    Returns:
        Both means, their difference and its standard error.
    """
    elbo = Trace_ELBO(
        num_particles=particles, vectorize_particles=True, max_plate_nesting=1
    )
    with forked_rng(x, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        total = sum(
            -elbo.loss(model, guide, x[i : i + chunk]) for i in range(0, len(x), chunk)
        )
    pyro_mean, n = total / len(x), len(x)
    k = result.k
    # per-datum variance of log w, from the K weights behind result.elbo_se
    var = result.elbo_se.square() * k
    se = (var.sum() / particles + result.elbo_se.square().sum()).sqrt().item() / n
    diff = pyro_mean - result.elbo.mean().item()
    above = pyro_mean - result.log_px.mean().item()
    if abs(diff) > n_sigma * se + _ROUNDING or above > n_sigma * se + _ROUNDING:
        raise EstimatorConsistencyError(
            f"Pyro's Trace_ELBO gives {pyro_mean:.4f} nats per datum but the "
            f"per-datum log-weights give an ELBO of {result.elbo.mean().item():.4f} "
            f"and log p-hat {result.log_px.mean().item():.4f} ({n_sigma:g} se = "
            f"{n_sigma * se:.3g}): the weights are wrong. Look for a sample site "
            "outside pyro.plate('data') (it mixes data), a flipped sign in a "
            "log-density, or a site the guide proposes that the model lacks."
        )
    return {"pyro_elbo": pyro_mean, "difference": diff, "se": se}
