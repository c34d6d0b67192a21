"""The gap's standard error (issue 13, point 6): paired, checked by simulation.

log p̂(x) and the ELBO come from the same K weights, so the se of their difference
is not sqrt(se² + se²). :mod:`pyro_vae.evaluate.marginal` uses the delta method on
the joint mean of (w, log w): se = sd_k(w_k / mean(w) - log w_k) / sqrt(K). Here it is
compared with the actual spread of the gap over many independent replicates.

The tolerance is the simulation's own error: the sample sd of R replicates of a
near-Normal quantity has sd ≈ sd / sqrt(2 (R - 1)), and the mean of R per-replicate
squared se's has its own standard error; the comparison allows 4 of their combined
standard error. The per-replicate se is compared as a root mean square
(sqrt(mean(se²))), since se² is what estimates Var(gap): the plain mean of se is
low by Jensen's inequality (about 2% here, well inside the tolerance at R = 2000,
but a bias, not noise).
"""

from __future__ import annotations

import math

import pytest
import torch

from pyro_vae.evaluate import log_marginal
from pyro_vae.evaluate.marginal import _chunk_statistics, iwae_grid
from pyro_vae.models import LinearGaussian, PosteriorGuide

R, K = 2000, 1000
OLD_FORMULA_SD = 0.052  # sqrt((e - 1) + 1) / sqrt(1000), the figure


def simulation_tolerance(gap: torch.Tensor, gap_se: torch.Tensor) -> float:
    """4 combined standard errors of (sample sd of the gap) and (rms of the se)."""
    sd = gap.std().item()
    sd_of_sd = sd / math.sqrt(2 * (len(gap) - 1))
    # delta method: se of sqrt(mean se²) = se(mean se²) / (2 sqrt(mean se²))
    ms = gap_se.square().mean()
    se_of_rms = (gap_se.square().std() / math.sqrt(len(gap)) / (2 * ms.sqrt())).item()
    return 4 * math.hypot(sd_of_sd, se_of_rms)


def rms(values: torch.Tensor) -> float:
    return values.square().mean().sqrt().item()


def test_gap_se_matches_the_spread_of_the_gap_for_normal_log_weights():
    # R replicates, one per column, of K log-weights ~ N(0, 1): the estimator's own
    # statistics code, as log_marginal runs it on a (K, data) buffer.
    gen = torch.Generator().manual_seed(2024)
    lw = torch.randn(K, R, generator=gen, dtype=torch.float64)
    stats = _chunk_statistics(lw, iwae_grid(K), psis=False)
    gap = stats["log_px"] - stats["elbo"]
    gap_se = stats["gap_se"]
    assert gap_se.shape == (R,) and (gap_se > 0).all()

    actual = gap.std().item()  # the true sd of the gap, up to simulation error
    tol = simulation_tolerance(gap, gap_se)
    assert tol < 0.1 * actual  # the check can fail: it resolves a 10% error
    assert abs(rms(gap_se) - actual) < tol, (rms(gap_se), actual, tol)
    # the delta method's value: Var = (e - 1) - 2 + 1 per weight, over K
    assert gap_se.mean().item() == pytest.approx(
        math.sqrt(math.e - 2) / math.sqrt(K), rel=0.05
    )
    assert actual == pytest.approx(0.026, abs=0.002)  # the figure

    # the independent formula the summary used before is twice too wide
    old = (stats["log_px_se"].square() + stats["elbo_se"].square()).sqrt()
    assert rms(old) == pytest.approx(OLD_FORMULA_SD, abs=0.002)
    assert abs(rms(old) - actual) > 10 * tol
    assert abs(rms(gap_se) - OLD_FORMULA_SD) > 0.02


def test_gap_se_through_log_marginal_on_the_oracle():
    """End to end: one datum, R rows, each with its own K draws of a wide guide."""
    gen = torch.Generator().manual_seed(1234)
    oracle = LinearGaussian(
        torch.randn(5, 2, generator=gen, dtype=torch.float64),
        torch.randn(5, generator=gen, dtype=torch.float64),
        0.5,
    )
    x = oracle.sample(1).expand(R, -1)
    guide = PosteriorGuide(oracle, shift=0.2, scale=1.3, diagonal=True)
    result = log_marginal(oracle, guide, x, k=K, data_chunk=R, seed=0, psis=False)

    actual = result.gap.std().item()
    tol = simulation_tolerance(result.gap, result.gap_se)
    assert tol < 0.1 * actual
    assert abs(rms(result.gap_se) - actual) < tol, (rms(result.gap_se), actual, tol)
    old = (result.log_px_se.square() + result.elbo_se.square()).sqrt()
    assert abs(rms(old) - actual) > 10 * tol

    summary = result.summary()
    expected = result.gap_se.square().sum().sqrt().item() / R
    assert summary["gap"]["se"] == pytest.approx(expected, rel=1e-12)
    assert summary["gap"]["mean"] == pytest.approx(result.gap.mean().item())


def test_gap_se_is_stable_for_large_and_flat_log_weights():
    gen = torch.Generator().manual_seed(7)
    lw = torch.randn(K, 5, generator=gen, dtype=torch.float64)
    base = _chunk_statistics(lw, [K], psis=False)["gap_se"]
    # a constant shift of the log-weights does not change the gap: no overflow
    for shift in (-5000.0, 5000.0):
        shifted = _chunk_statistics(lw + shift, [K], psis=False)["gap_se"]
        torch.testing.assert_close(shifted, base, rtol=1e-9, atol=0)
    # equal weights: the gap is exactly 0 with no Monte Carlo error
    flat = _chunk_statistics(torch.full((K, 3), -123.4), [K], psis=False)
    assert (flat["gap_se"].abs() < 1e-12).all()
    # nearly equal weights: the gap's error is second order in their spread, far
    # below either se alone (the old formula's floor)
    eps = 1e-4
    tiny = _chunk_statistics(eps * lw, [K], psis=False)
    assert (tiny["gap_se"] < 10 * eps**2).all()
    assert (tiny["elbo_se"] > 0.5 * eps / math.sqrt(K)).all()
