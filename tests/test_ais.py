"""AIS and BDMC against exact answers: pPCA, a quadrature model, a positive latent."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_vae.errors import ConfigError, DataError
from pyro_vae.evaluate import SiteContractError, log_marginal
from pyro_vae.evaluate.ais import ais_log_marginal
from pyro_vae.evaluate.annealing import betas
from pyro_vae.evaluate.bdmc import bdmc, simulate
from pyro_vae.models import VAE
from pyro_vae.models.likelihoods import BernoulliLikelihood
from pyro_vae.models.linear_gaussian import LinearGaussian, PosteriorGuide

FAST = {"chains": 4, "leapfrog": 3}


def _ppca(seed: int = 0, d_x: int = 6, d_z: int = 2) -> LinearGaussian:
    torch.manual_seed(seed)
    return LinearGaussian(torch.randn(d_x, d_z), torch.randn(d_x), 0.5)


@pytest.fixture(scope="module")
def oracle():
    """pPCA, 10 data, and a poor guide: shifted by 0.7 and half as wide."""
    torch.set_default_dtype(torch.float64)  # before the autouse harness runs
    pyro.settings.set(module_local_params=True)
    model = _ppca()
    x = model.sample(10).detach()
    return model, PosteriorGuide(model, shift=0.7, scale=0.5), x, model.log_px(x)


def _mean_se(values: torch.Tensor, se: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), se.square().sum().sqrt().item() / len(values)


def test_ais_corrects_a_poor_guide_on_ppca(oracle):
    model, guide, x, exact = oracle
    is_ = log_marginal(model, guide, x, 1000, seed=0)
    is_bias, is_se = _mean_se(is_.log_px - exact, is_.log_px_se)
    assert is_bias < -10 * is_se - 1.0  # importance sampling is visibly biased
    ais = ais_log_marginal(model, guide, x, steps=1000, chains=8, leapfrog=5, seed=1)
    bias, se = _mean_se(ais.log_px - exact, ais.log_px_se)
    assert abs(bias) < 5 * se
    assert abs(bias) < 0.2
    assert 0.5 < ais.acceptance.mean().item() < 0.9  # the pilot aimed at 0.65
    summary = ais.summary()
    assert summary["n"] == 10 and summary["steps"] == 1000
    assert ais.log_weights.shape == (8, 10)
    assert ais.step_sizes.shape[1:] == (8, 10)


@pytest.fixture(scope="module")
def sandwich(oracle):
    model, guide, _, _ = oracle
    result = bdmc(model, guide, 10, steps=[100, 1000], chains=8, leapfrog=5, seed=3)
    x, _ = simulate(model, 10, [], seed=3, device=torch.device("cpu"))
    return result, model.log_px(x)


def test_bdmc_brackets_the_exact_value(sandwich):
    result, exact = sandwich
    for row in result.rows:
        lower = row.lower - exact  # E[lower] <= 0 <= E[upper]
        upper = row.upper - exact
        se = lower.std().item() / math.sqrt(len(lower))
        assert lower.mean().item() < 5 * se
        se = upper.std().item() / math.sqrt(len(upper))
        assert upper.mean().item() > -5 * se


def test_bdmc_gap_shrinks_with_steps(sandwich):
    result, _ = sandwich
    gaps = [row.gap.mean().item() for row in result.rows]
    assert gaps[1] < gaps[0]
    assert gaps[1] < 0.3
    assert result.shrinks()
    summary = result.summary()
    assert [r["steps"] for r in summary["rows"]] == [100, 1000]
    assert summary["gap_shrinks_with_steps"] is True


class _TanhBernoulli(PyroModule):
    """z ~ N(0, I_2), x | z ~ Bernoulli(logits = W2 tanh(W1 z + b1) + b2)."""

    def __init__(self, d_x: int = 12, hidden: int = 8) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.decoder = nn.Sequential(
            nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, d_x)
        )
        for p in self.decoder.parameters():
            p.data.mul_(2.0)

    def forward(self, x=None, n=None):
        size = len(x) if x is not None else n
        with pyro.plate("data", size):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            logits = self.decoder(z)
            return pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    @torch.no_grad()
    def exact_log_px(self, x: torch.Tensor, points: int = 801) -> torch.Tensor:
        """log ∫ p(z) p(x|z) dz on a grid over [-7, 7]^2 (trapezoid-free: the mass
        near the border is below 1e-10)."""
        g = torch.linspace(-7, 7, points)
        z = torch.cartesian_prod(g, g)
        cell = math.log((g[1] - g[0]).item() ** 2)
        log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        logits = self.decoder(z)
        lik = dist.Bernoulli(logits=logits[:, None]).log_prob(x[None]).sum(-1)
        return torch.logsumexp(log_prior[:, None] + lik, 0) + cell


def test_ais_from_the_prior_matches_quadrature():
    model = _TanhBernoulli()
    pyro.set_rng_seed(2)
    x = model(n=6).detach()
    exact = model.exact_log_px(x)
    ais = ais_log_marginal(
        model, None, x, steps=500, chains=16, leapfrog=5, start="prior", seed=0
    )
    err, se = _mean_se(ais.log_px - exact, ais.log_px_se)
    assert abs(err) < 0.05
    assert abs(err) < 5 * se + 0.01


def test_ais_weights_are_unbiased_on_ppca():
    """E[p̂_AIS(x)] = p(x): the mean over seeds of exp(log p̂ - log p(x)) is 1."""
    model = _ppca(1, d_x=4, d_z=2)
    x = model.sample(4).detach()
    guide = PosteriorGuide(model, shift=0.3, scale=0.8)
    exact = model.log_px(x)
    ratios = torch.stack(
        [
            (
                ais_log_marginal(model, guide, x, steps=30, seed=s, **FAST).log_px
                - exact
            ).exp()
            for s in range(60)
        ]
    )  # (seeds, data): every entry has expectation 1
    means = ratios.mean(0)
    se = ratios.std(0) / math.sqrt(len(ratios))
    assert ((means - 1).abs() < 5 * se).all(), (means, se)
    assert (se < 0.2).all()  # the test has power: p̂ is not wildly noisy


def test_one_step_is_importance_sampling_with_the_same_draws(oracle):
    model, guide, x, _ = oracle
    ais = ais_log_marginal(model, guide, x, steps=1, chains=16, seed=4)
    is_ = log_marginal(
        model, guide, x, 16, seed=4, data_chunk=1, particle_chunk=16, psis=False
    )
    torch.testing.assert_close(ais.log_px, is_.log_px, rtol=0, atol=1e-12)
    torch.testing.assert_close(ais.log_px_se, is_.log_px_se, rtol=0, atol=1e-12)


def test_chunks_and_shards_do_not_change_the_numbers(oracle):
    model, guide, x, _ = oracle
    whole = ais_log_marginal(model, guide, x, steps=6, seed=2, **FAST)
    chunked = ais_log_marginal(model, guide, x, steps=6, seed=2, data_chunk=3, **FAST)
    torch.testing.assert_close(chunked.log_weights, whole.log_weights)
    shard = ais_log_marginal(
        model, guide, x[4:7], steps=6, seed=2, index_offset=4, **FAST
    )
    torch.testing.assert_close(shard.log_weights, whole.log_weights[:, 4:7])
    assert chunked.chunks == {"data": 3}


def test_seed_none_uses_the_torch_stream_and_leaves_modules_in_their_mode(oracle):
    model, guide, x, _ = oracle
    guide.eval()  # (recursively: the guide holds the model)
    model.train()
    torch.manual_seed(8)
    a = ais_log_marginal(model, guide, x[:2], steps=3, **FAST)
    torch.manual_seed(8)
    b = ais_log_marginal(model, guide, x[:2], steps=3, **FAST)
    torch.testing.assert_close(a.log_px, b.log_px)
    assert model.training and not guide.training


class _LogNormalModel(PyroModule):
    """log z ~ N(0, 1), x | z ~ N(w log z + b, s²): a positive latent, exact p(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.b, self.s = torch.tensor([1.5, -0.5, 0.8]), 0.3, 0.6

    def forward(self, x=None, n=None):
        size = len(x) if x is not None else n
        with pyro.plate("data", size):
            z = pyro.sample("z", dist.LogNormal(torch.zeros(1), 1.0).to_event(1))
            loc = z.log() * self.w + self.b
            return pyro.sample("x", dist.Normal(loc, self.s).to_event(1), obs=x)

    def log_px(self, x):
        cov = torch.outer(self.w, self.w) + self.s**2 * torch.eye(3)
        return dist.MultivariateNormal(torch.full((3,), self.b), cov).log_prob(x)


class _LogNormalGuide(PyroModule):
    def __init__(self, model: _LogNormalModel) -> None:
        super().__init__()
        self.m = model

    def forward(self, x):
        precision = 1 + (self.m.w**2).sum() / self.m.s**2
        mean = ((x - self.m.b) @ self.m.w / self.m.s**2 / precision)[:, None]
        with pyro.plate("data", len(x)):
            return pyro.sample(
                "z", dist.LogNormal(mean + 0.5, 0.7 / precision.sqrt()).to_event(1)
            )


def test_a_positive_latent_moves_in_unconstrained_space():
    model = _LogNormalModel()
    guide = _LogNormalGuide(model)
    pyro.set_rng_seed(1)
    x = model(n=8).detach()
    ais = ais_log_marginal(model, guide, x, steps=300, chains=8, leapfrog=5, seed=0)
    err, se = _mean_se(ais.log_px - model.log_px(x), ais.log_px_se)
    assert abs(err) < 5 * se + 0.01
    assert ais.acceptance.mean() > 0.4


def test_schedules():
    sig, lin = betas(10), betas(10, "linear")
    for b in (sig, lin):
        assert b[0] == 0 and b[-1] == 1 and (b.diff() > 0).all()
    assert sig[1] < lin[1]  # the sigmoid lingers near both ends
    with pytest.raises(ConfigError, match="unknown annealing schedule"):
        betas(10, "cosine")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 0}, ConfigError, "steps must be a whole number >= 1"),
        ({"chains": -1}, ConfigError, "chains must be"),
        ({"leapfrog": 0}, ConfigError, "leapfrog must be"),
        ({"steps": 2.5}, ConfigError, "steps must be"),
        ({"start": "posterior"}, ConfigError, "start must be one of"),
        ({"schedule": "cosine"}, ConfigError, "unknown annealing schedule"),
        ({"target_accept": 1.0}, ConfigError, "target_accept"),
        ({"pilot_steps": 0}, ConfigError, "pilot_steps"),
    ],
)
def test_bad_settings_are_refused(oracle, kwargs, error, match):
    model, guide, x, _ = oracle
    with pytest.raises(error, match=match):
        ais_log_marginal(model, guide, x, **kwargs)


def test_bad_data_and_missing_guide_are_refused(oracle):
    model, guide, x, _ = oracle
    with pytest.raises(DataError, match="reshape"):
        ais_log_marginal(model, guide, x[0], steps=2)
    with pytest.raises(DataError, match="floats"):
        ais_log_marginal(model, guide, x.long(), steps=2)
    with pytest.raises(ConfigError, match='start="prior"'):
        ais_log_marginal(model, None, x, steps=2)
    with pytest.raises(ConfigError, match=">= 2"):
        bdmc(model, guide, 3, steps=[1, 10])


def _discrete_model(x):
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Categorical(logits=torch.zeros(3)))
        loc = c.double()[..., None].expand(*c.shape, x.shape[-1])
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


def _discrete_guide(x):
    with pyro.plate("data", len(x)):
        pyro.sample("c", dist.Categorical(logits=torch.zeros(3)))


def _global_model(x):
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        loc = (z.sum(-1, keepdim=True) * scale).expand(*z.shape[:-1], x.shape[-1])
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


def _global_guide(x):
    pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))


@pytest.mark.parametrize(
    ("model", "guide", "match"),
    [
        (_discrete_model, _discrete_guide, "discrete"),
        (_global_model, _global_guide, "pyro.plate\\('data'\\)"),
    ],
)
def test_latents_that_break_the_contract_are_refused(model, guide, match):
    x = torch.randn(4, 3)
    with pytest.raises(SiteContractError, match=match):
        ais_log_marginal(model, guide, x, steps=2)


def test_bernoulli_vae_simulates_binary_data():
    decoder = nn.Linear(2, 5)
    model = VAE(dist.Normal(torch.zeros(2), 1.0).to_event(1), decoder,
                BernoulliLikelihood())  # fmt: skip
    x, z = simulate(model, 7, ["z"], seed=0, device=torch.device("cpu"))
    assert x.shape == (7, 5) and z["z"].shape == (7, 2)
    assert set(x.unique().tolist()) <= {0.0, 1.0}


class _DirichletMultinomial(PyroModule):
    """z ~ Dirichlet(α) on the simplex, x | z ~ Multinomial(20, z): exact p(x)."""

    alpha = torch.tensor([1.5, 2.0, 0.8])

    def forward(self, x=None, n=None):
        size = len(x) if x is not None else n
        with pyro.plate("data", size):
            z = pyro.sample("z", dist.Dirichlet(self.alpha))
            return pyro.sample("x", dist.Multinomial(20, probs=z), obs=x)

    def log_px(self, x):
        return dist.DirichletMultinomial(self.alpha, total_count=20).log_prob(x)


def _dirichlet_guide(x):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Dirichlet(0.5 * (_DirichletMultinomial.alpha + x) + 0.3))


def test_a_simplex_latent_moves_in_fewer_unconstrained_numbers():
    """The stick-breaking bijection maps K = 3 probabilities to 2 free numbers."""
    model = _DirichletMultinomial()
    pyro.set_rng_seed(0)
    x = model(n=6).detach()
    ais = ais_log_marginal(model, _dirichlet_guide, x, steps=200, leapfrog=5,
                           chains=8, seed=0)  # fmt: skip
    err, se = _mean_se(ais.log_px - model.log_px(x), ais.log_px_se)
    assert abs(err) < 5 * se + 0.01
    assert ais.acceptance.mean() > 0.4


def test_hmc_rejects_a_proposal_whose_density_is_infinite():
    """+inf at the proposal would be accepted with α = 1 and make w infinite."""
    from pyro_vae.evaluate.annealing import Point, hmc

    def densities(u):
        inf = torch.where(u[..., 0] > 0.5, math.inf, 0.0)
        base = -0.5 * u.square().sum(-1) + inf
        g = -u
        return Point(u, base, base, g, g)

    start = densities(torch.zeros(1, 1, 1))
    momentum = torch.ones(1, 1, 1)  # moves u to 1: the density there is +inf
    new, alpha = hmc(densities, start, 1.0, torch.ones(1, 1), 1, momentum,
                     torch.full((1, 1), 0.5))  # fmt: skip
    assert alpha.item() == 0.0 and new.u.item() == 0.0


def test_counters_use_all_64_bits():
    from pyro_vae.rng import counter_bits, datum_keys

    keys = datum_keys(0, torch.arange(3))
    assert not torch.equal(counter_bits(keys, 5, 4), counter_bits(keys, 5 + 2**32, 4))
    with pytest.raises(ValueError, match="64-bit"):
        counter_bits(keys, 2**64, 4)


def test_bdmc_sorts_its_steps_and_finds_the_model_device(oracle):
    model, guide, _, _ = oracle
    result = bdmc(model, guide, 3, steps=[6, 3, 6], seed=0, **FAST)
    assert [row.steps for row in result.rows] == [3, 6]
    assert result.summary()["bounds_cross_at_steps"] == []
    with pytest.raises(ConfigError, match="n >= 2"):
        bdmc(model, guide, 1, steps=[3])


def test_one_chain_is_refused(oracle):
    model, guide, x, _ = oracle
    with pytest.raises(ConfigError, match="chains must be >= 2"):
        ais_log_marginal(model, guide, x, steps=3, chains=1)
