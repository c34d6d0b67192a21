"""The Pyro-trace AIS equals a hand-written pure-torch AIS on the MLP VAE.

Same starting points, frozen step sizes and counter keys: the two give the same
log-weights to float64 rounding, which checks the trace-based potential, its
gradients and the HMC transitions against an independent implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.evaluate.ais import ESTIMATE, _Target
from pyro_vae.evaluate.annealing import Noise, StepSizes, anneal, betas
from pyro_vae.evaluate.reference_ais import mlp_vae_ais
from pyro_vae.rng import datum_keys

STEPS, LEAPFROG, CHAINS, N, BINS, SEED = 5, 3, 4, 3, 2, 123


@pytest.mark.parametrize(
    ("cfg", "sigma"),
    [
        (FitConfig(hidden=(16,), latent_dim=3), None),
        (FitConfig(hidden=(16,), latent_dim=3, likelihood="gaussian", sigma=0.5), 0.5),
    ],
    ids=["bernoulli", "gaussian"],
)
@pytest.mark.parametrize("schedule", ["sigmoid", "linear"])
def test_trace_ais_matches_hand_written_ais(cfg, sigma, schedule):
    model, guide = build_model_and_guide(cfg, 12)
    model.eval(), guide.eval()
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(N, 12, generator=gen, dtype=torch.float64)
    if sigma is None:
        x = (x < 0.4).double()
    index = torch.arange(N) + 7  # a shard that does not start at datum 0
    keys = datum_keys(SEED, index)
    # Step sizes spanning rejections and acceptances, different per chain and datum.
    log_eps = torch.empty(BINS, CHAINS, N).uniform_(math.log(0.05), math.log(3.0))

    target = _Target(model, guide, "guide")
    target.validate(x)
    u0 = target.initial(x, CHAINS, SEED, index, stream=ESTIMATE)
    traced = anneal(
        target.densities(x, CHAINS),
        u0,
        betas(STEPS, schedule),
        StepSizes(log_eps),
        LEAPFROG,
        Noise(keys, ESTIMATE),
    )
    ref = mlp_vae_ais(
        guide.encoder,
        model.decoder,
        x,
        steps=STEPS,
        leapfrog=LEAPFROG,
        step_sizes=log_eps.exp(),
        u0=u0,
        keys=keys,
        stream=ESTIMATE,
        scale_floor=guide.scale_floor,
        sigma=sigma,
        schedule=schedule,
    )
    assert ref.dtype == torch.float64 and ref.shape == (CHAINS, N)
    # Not vacuous: chains moved, and some proposals were rejected.
    assert 0.05 < traced.acceptance.mean().item() < 0.9, traced.acceptance
    assert not torch.equal(traced.point.u, u0)
    torch.testing.assert_close(traced.log_weights, ref, atol=1e-10, rtol=1e-12)


def test_one_step_is_importance_sampling():
    """T = 1 has no transition: log w = log p(x, z0) - log q(z0 | x)."""
    model, guide = build_model_and_guide(FitConfig(hidden=(16,), latent_dim=2), 12)
    model.eval(), guide.eval()
    x = (torch.rand(N, 12, generator=torch.Generator().manual_seed(1)) < 0.5).double()
    u0 = torch.randn(CHAINS, N, 2)
    log_w = mlp_vae_ais(
        guide.encoder,
        model.decoder,
        x,
        steps=1,
        leapfrog=1,
        step_sizes=torch.full((1, CHAINS, N), math.nan),
        u0=u0,
        keys=datum_keys(0, torch.arange(N)),
        stream=ESTIMATE,
        scale_floor=guide.scale_floor,
    )
    q = guide.posterior(x)
    expected = (
        model.prior_dist().log_prob(u0)
        + model.conditional(u0).log_prob(x)
        - q.log_prob(u0)
    )
    torch.testing.assert_close(log_w, expected, atol=1e-10, rtol=0)
