"""Structure of the built-in VAE parts: registries, sites, shapes, gradients, errors.

Every registered prior, likelihood and guide is put together into a VAE, the guide
is traced and the model replayed against it, and the sites, their shapes and the
model/guide agreement are checked under Pyro's validation (which, with pytest's
warnings-as-errors, fails on any mismatch). Likelihood densities are compared with
their textbook formulas; gradients with central finite differences under a fixed
seed.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.util import site_is_subsample
from torch.nn import functional as F

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.guides import GUIDES
from pyro_vae.models import (
    DECODERS,
    LIKELIHOODS,
    PRIORS,
    VAE,
    BernoulliLikelihood,
    GaussianLikelihood,
    LearnedGaussianLikelihood,
    StandardNormalPrior,
    mlp_decoder,
)

D, d, N = 12, 3, 5
HIDDEN = (16,)


def make_data(likelihood_name: str, n: int = N) -> torch.Tensor:
    """Binary data for Bernoulli, data in [0, 1] for the Gaussians."""
    gen = torch.Generator().manual_seed(42)
    x = torch.rand(n, D, generator=gen, dtype=torch.float64)
    if likelihood_name == "bernoulli":
        x = (x > 0.5).to(x)
        assert set(x.unique().tolist()) == {0.0, 1.0}
    if likelihood_name == "discretized-logistic":
        x = torch.round(x * 255) / 255  # 8-bit intensities k/255
    return x


def _config(**names) -> FitConfig:
    return FitConfig(latent_dim=d, hidden=HIDDEN, **names)


def make_vae(likelihood_name: str, prior_name: str = "normal") -> VAE:
    cfg = _config(likelihood=likelihood_name, prior=prior_name)
    return build_model_and_guide(cfg, D)[0]


def make_guide(guide_name: str) -> torch.nn.Module:
    return build_model_and_guide(_config(guide=guide_name), D)[1]


def sample_site_names(trace) -> set[str]:
    """Names of latent and observed sample sites (plates excluded)."""
    return {
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def traces(model, guide, x: torch.Tensor):
    guide_tr = poutine.trace(guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x)
    guide_tr.compute_log_prob()
    model_tr.compute_log_prob()
    return model_tr, guide_tr


def loss_at_seed(model, guide, x: torch.Tensor, seed: int = 3) -> torch.Tensor:
    pyro.set_rng_seed(seed)
    return Trace_ELBO().differentiable_loss(model, guide, x)


def fd_grad(model, guide, x: torch.Tensor, param: torch.Tensor, index, h=1e-6):
    """Central difference of the seeded loss in one entry of ``param``."""
    with torch.no_grad():
        old = param[index].item()
        param[index] = old + h
        up = loss_at_seed(model, guide, x).item()
        param[index] = old - h
        down = loss_at_seed(model, guide, x).item()
        param[index] = old
    return (up - down) / (2 * h)


ALL_COMBOS = [
    (p, lik, g) for p in sorted(PRIORS) for lik in sorted(LIKELIHOODS) for g in GUIDES
]


def test_registries_are_populated():
    assert "normal" in PRIORS
    assert {"bernoulli", "gaussian", "gaussian-learned"} <= set(LIKELIHOODS)
    assert "diagonal" in GUIDES
    assert "mlp" in DECODERS


@pytest.mark.parametrize("prior_name,lik_name,guide_name", ALL_COMBOS)
def test_sites_shapes_and_agreement(prior_name, lik_name, guide_name):
    model = make_vae(lik_name, prior_name)
    guide = make_guide(guide_name)
    x = make_data(lik_name)
    model.likelihood.check_data(x)  # the data suit the likelihood

    model_tr, guide_tr = traces(model, guide, x)
    assert sample_site_names(model_tr) == {"z", "x"}
    assert sample_site_names(guide_tr) == {"z"}
    assert model_tr.nodes["x"]["is_observed"]
    assert not model_tr.nodes["z"]["is_observed"]
    assert not guide_tr.nodes["z"]["is_observed"]
    torch.testing.assert_close(model_tr.nodes["x"]["value"], x, rtol=0, atol=0)
    assert model_tr.nodes["z"]["value"] is guide_tr.nodes["z"]["value"]
    assert model_tr.nodes["z"]["value"].shape == (N, d)
    for tr in (model_tr, guide_tr):
        assert tr.nodes["z"]["fn"].event_dim == 1
        assert tr.nodes["z"]["fn"].event_shape == (d,)
        assert tr.nodes["z"]["log_prob"].shape == (N,)
    assert model_tr.nodes["x"]["fn"].event_dim == 1
    assert model_tr.nodes["x"]["fn"].event_shape == (D,)
    assert model_tr.nodes["x"]["log_prob"].shape == (N,)

    # The prior on its own: event (d,), batch () (the data plate broadcasts it).
    prior = model.prior_dist()
    assert prior.event_shape == (d,) and prior.batch_shape == ()

    # Runs under validation; warnings are errors, so a mismatch would fail here.
    loss = Trace_ELBO().differentiable_loss(model, guide, x)
    assert loss.shape == () and torch.isfinite(loss)
    # The loss is the negative sum of the per-datum log weights of this draw.
    pyro.set_rng_seed(11)
    model_tr, guide_tr = traces(model, guide, x)
    log_w = (
        model_tr.nodes["z"]["log_prob"]
        + model_tr.nodes["x"]["log_prob"]
        - guide_tr.nodes["z"]["log_prob"]
    )
    pyro.set_rng_seed(11)
    loss = Trace_ELBO().loss(model, guide, x)
    assert loss == pytest.approx(-log_w.sum().item(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("prior_name,lik_name,guide_name", ALL_COMBOS)
def test_vectorized_particles(prior_name, lik_name, guide_name):
    model = make_vae(lik_name, prior_name)
    guide = make_guide(guide_name)
    x = make_data(lik_name)
    P = 3

    loss = Trace_ELBO(num_particles=P, vectorize_particles=True).loss(model, guide, x)
    assert math.isfinite(loss)

    def plated(fn):
        def wrapped(x):
            with pyro.plate("particles", P, dim=-2):
                return fn(x)

        return wrapped

    model_tr, guide_tr = traces(plated(model), plated(guide), x)
    assert sample_site_names(model_tr) == {"z", "x"}
    assert guide_tr.nodes["z"]["value"].shape == (P, N, d)
    for tr in (model_tr, guide_tr):
        assert tr.nodes["z"]["log_prob"].shape == (P, N)
    assert model_tr.nodes["x"]["log_prob"].shape == (P, N)

    # The vectorized loss is the mean over particles of the per-draw losses, drawn
    # from the same random numbers as a particle-plated trace under the same seed.
    pyro.set_rng_seed(5)
    model_tr, guide_tr = traces(plated(model), plated(guide), x)
    log_w = (
        model_tr.nodes["z"]["log_prob"]
        + model_tr.nodes["x"]["log_prob"]
        - guide_tr.nodes["z"]["log_prob"]
    )
    elbo = Trace_ELBO(num_particles=P, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(5)
    loss = elbo.loss(model, guide, x)
    assert loss == pytest.approx(-log_w.sum().item() / P, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("lik_name", sorted(LIKELIHOODS))
def test_gradients_reach_encoder_decoder_and_likelihood(lik_name):
    pyro.clear_param_store()
    model = make_vae(lik_name)
    guide = make_guide("diagonal")
    x = make_data(lik_name)

    loss = loss_at_seed(model, guide, x)
    loss.backward()

    # Every parameter gets a gradient; the totals per network are nonzero.
    for module in (guide.encoder, model.decoder):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads)
        assert torch.sqrt(sum((g**2).sum() for g in grads)) > 1e-6

    # And the gradients are right: compare one entry of the encoder's and the
    # decoder's last-layer bias with central differences of the seeded loss.
    enc_bias = guide.encoder[-1].bias  # the first d entries move mu, the rest sigma
    dec_bias = model.decoder[-1].bias
    checks = [(enc_bias, 0), (enc_bias, d), (dec_bias, 0)]
    if lik_name == "gaussian-learned":
        assert set(dict(model.named_parameters())) >= {"likelihood.rho"}
        checks.append((model.likelihood.rho, ()))
        assert model.likelihood.rho.grad is not None
        assert model.likelihood.rho.grad.abs() > 1e-6
    for param, index in checks:
        expected = fd_grad(model, guide, x, param, index)
        assert abs(expected) > 1e-6  # not a vacuous comparison
        assert param.grad[index].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)

    # Module-local parameters only: nothing went to Pyro's global store.
    assert list(pyro.get_param_store().keys()) == []


def test_learned_sigma_starts_at_init():
    lik = LearnedGaussianLikelihood(init_sigma=0.7, floor=1e-3)
    assert abs(lik.sigma.item() - 0.7) < 1e-12
    assert lik.rho.requires_grad
    lik = LIKELIHOODS["gaussian-learned"](sigma=0.3, sigma_floor=0.01)
    assert abs(lik.sigma.item() - 0.3) < 1e-12
    assert lik.floor == 0.01


def test_likelihood_factories_take_and_ignore_options():
    assert LIKELIHOODS["gaussian"](sigma=0.5, sigma_floor=0.1).sigma == 0.5
    assert isinstance(LIKELIHOODS["bernoulli"](sigma=0.5), BernoulliLikelihood)
    assert LIKELIHOODS["gaussian"]().sigma == 1.0


@pytest.mark.parametrize("lik_name", sorted(LIKELIHOODS))
def test_likelihood_shapes(lik_name):
    lik = LIKELIHOODS[lik_name](data_dim=D)
    out = torch.randn(4, N, D * lik.params_per_feature)
    px = lik(out)
    assert px.event_shape == (D,)
    assert px.batch_shape == (4, N)


def test_gaussian_sigma_one_is_squared_error():
    mu = torch.randn(N, D)
    x = torch.rand(N, D)
    log_p = GaussianLikelihood(sigma=1.0)(mu).log_prob(x)
    expected = -0.5 * ((x - mu) ** 2).sum(-1) - 0.5 * D * math.log(2 * math.pi)
    assert log_p.shape == (N,)
    torch.testing.assert_close(log_p, expected, rtol=0, atol=1e-12)


def test_gaussian_fixed_sigma_density():
    mu, x, sigma = torch.randn(N, D), torch.rand(N, D), 0.3
    log_p = GaussianLikelihood(sigma=sigma)(mu).log_prob(x)
    expected = (
        -0.5 * ((x - mu) ** 2).sum(-1) / sigma**2
        - D * math.log(sigma)
        - 0.5 * D * math.log(2 * math.pi)
    )
    torch.testing.assert_close(log_p, expected, rtol=0, atol=1e-12)


def test_bernoulli_is_negative_bce_with_logits():
    logits = 3 * torch.randn(N, D)
    x = torch.bernoulli(torch.full((N, D), 0.5))
    log_p = BernoulliLikelihood()(logits).log_prob(x)
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    assert log_p.shape == (N,)
    torch.testing.assert_close(log_p, -bce, rtol=0, atol=1e-12)


def test_bernoulli_check_data():
    lik = BernoulliLikelihood()
    lik.check_data(make_data("bernoulli"))  # binary data pass
    grey = make_data("gaussian")
    with pytest.raises(ValueError, match="--binarize"):
        lik.check_data(grey)
    half_binary = make_data("bernoulli")
    half_binary[0, 0] = 0.5
    with pytest.raises(ValueError, match="--binarize"):
        lik.check_data(half_binary)


@pytest.mark.parametrize("lik_name", sorted(LIKELIHOODS))
def test_check_data_rejects_non_finite(lik_name):
    x = make_data(lik_name)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        LIKELIHOODS[lik_name](data_dim=D).check_data(x)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("inf"), float("nan")])
def test_gaussian_rejects_bad_sigma(sigma):
    with pytest.raises(ValueError):
        GaussianLikelihood(sigma=sigma)


@pytest.mark.parametrize("init_sigma,floor", [(1e-3, 1e-3), (0.5, 0.0), (0.5, 1.0)])
def test_learned_gaussian_rejects_bad_floor(init_sigma, floor):
    with pytest.raises(ValueError):
        LearnedGaussianLikelihood(init_sigma=init_sigma, floor=floor)


@pytest.mark.parametrize("latent_dim", [0, -2])
def test_prior_rejects_bad_latent_dim(latent_dim):
    with pytest.raises(ValueError):
        StandardNormalPrior(latent_dim)


def test_standard_normal_prior_density():
    prior = StandardNormalPrior(d)()
    z = torch.randn(N, d)
    expected = -0.5 * (z**2).sum(-1) - 0.5 * d * math.log(2 * math.pi)
    torch.testing.assert_close(prior.log_prob(z), expected, rtol=0, atol=1e-12)


def test_custom_distribution_prior():
    prior = dist.Normal(torch.zeros(d), 2.0).to_event(1)
    lik = GaussianLikelihood(sigma=1.0)
    model = VAE(prior, mlp_decoder(d, D, HIDDEN, "relu"), lik)
    guide = make_guide("diagonal")
    x = make_data("gaussian")

    assert isinstance(model.prior, torch.nn.Module)  # follows .to(), in state_dict
    model_tr, guide_tr = traces(model, guide, x)
    assert sample_site_names(model_tr) == {"z", "x"}
    z = model_tr.nodes["z"]["value"]
    log_pz = model_tr.nodes["z"]["log_prob"]
    assert log_pz.shape == (N,)
    torch.testing.assert_close(log_pz, prior.log_prob(z), rtol=0, atol=0)
    expected = (
        -0.5 * (z**2).sum(-1) / 4 - d * math.log(2.0) - 0.5 * d * math.log(2 * math.pi)
    )
    torch.testing.assert_close(log_pz, expected, rtol=0, atol=1e-12)
    loss = Trace_ELBO(num_particles=2, vectorize_particles=True).loss(model, guide, x)
    assert math.isfinite(loss)
