"""Exact-answer tests on the linear-Gaussian (pPCA) oracle.

z ~ N(0, I_d), x | z ~ N(W z + b, sigma^2 I_D), so log p(x), p(z | x) and, for a
Gaussian guide q, KL(q || p(z | x)) are all closed form. Monte Carlo estimates are
compared with these exact values within 5 of their own standard errors, under the
fixed seed the conftest sets; each such test also checks that its standard error is
small enough for the comparison to be able to fail.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_vae.models import LinearGaussian, PosteriorGuide

D, d, N = 5, 2, 4
SIGMA = 0.5


@pytest.fixture
def oracle_and_data():
    """A pPCA model with random W, b (seeded) and N data drawn from it."""
    gen = torch.Generator().manual_seed(1234)
    weight = torch.randn(D, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(D, generator=gen, dtype=torch.float64)
    z = torch.randn(N, d, generator=gen, dtype=torch.float64)
    noise = torch.randn(N, D, generator=gen, dtype=torch.float64)
    x = z @ weight.T + bias + SIGMA * noise
    return LinearGaussian(weight, bias, SIGMA), x


def as_mvn(q: dist.Distribution) -> dist.MultivariateNormal:
    """q as a MultivariateNormal (a diagonal Normal.to_event(1) becomes diag cov)."""
    if isinstance(q, dist.MultivariateNormal):
        return q
    base = q.base_dist
    return dist.MultivariateNormal(base.loc, scale_tril=torch.diag_embed(base.scale))


def exact_kl(guide: PosteriorGuide, oracle: LinearGaussian, x: torch.Tensor):
    """KL(q(z|x) || p(z|x)) per datum, shape (N,)."""
    return torch.distributions.kl_divergence(as_mvn(guide.q(x)), oracle.posterior(x))


def log_weights(model, guide, x: torch.Tensor, num_particles: int | None = None):
    """log p(x, z) - log q(z | x) per datum: shape (N,), or (M, N) for M particles."""
    if num_particles is not None:

        def run(fn):
            def wrapped(x):
                with pyro.plate("particles", num_particles, dim=-2):
                    return fn(x)

            return wrapped

        model, guide = run(model), run(guide)
    with torch.no_grad():
        guide_tr = poutine.trace(guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x)
        z = guide_tr.nodes["z"]["value"]
        log_w = (
            model_tr.nodes["z"]["fn"].log_prob(z)
            + model_tr.nodes["x"]["fn"].log_prob(model_tr.nodes["x"]["value"])
            - guide_tr.nodes["z"]["fn"].log_prob(z)
        )
    return log_w


def test_exact_posterior_guide_gives_log_px(oracle_and_data):
    oracle, x = oracle_and_data
    guide = PosteriorGuide(oracle, shift=0.0, scale=1.0)
    with torch.no_grad():
        log_px = oracle.log_px(x)
    assert log_px.shape == (N,)

    # One draw: every importance weight equals p(x) exactly (zero variance).
    log_w = log_weights(oracle, guide, x)
    assert log_w.shape == (N,)
    torch.testing.assert_close(log_w, log_px, atol=1e-8, rtol=0)

    # Many draws at once, for the same reason all equal.
    log_w_many = log_weights(oracle, guide, x, num_particles=50)
    assert log_w_many.shape == (50, N)
    torch.testing.assert_close(log_w_many, log_px.expand(50, N), atol=1e-8, rtol=0)

    # Pyro's own ELBO over the whole batch.
    elbo = -Trace_ELBO().loss(oracle, guide, x)
    assert abs(elbo - log_px.sum().item()) < 1e-8


@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diagonal"])
def test_elbo_equals_log_px_minus_kl(oracle_and_data, diagonal):
    oracle, x = oracle_and_data
    guide = PosteriorGuide(oracle, shift=0.3, scale=1.4, diagonal=diagonal)
    q = guide.q(x)
    if diagonal:
        assert isinstance(q, dist.Independent)
    else:
        assert isinstance(q, dist.MultivariateNormal)

    M = 20000
    log_w = log_weights(oracle, guide, x, num_particles=M)
    assert log_w.shape == (M, N)
    mean = log_w.mean(0)
    se = log_w.std(0) / M**0.5

    with torch.no_grad():
        log_px = oracle.log_px(x)
        kl = exact_kl(guide, oracle, x)
    expected = log_px - kl

    assert (se < 0.05).all(), se  # the test has teeth
    assert ((mean - expected).abs() < 5 * se).all(), (mean - expected) / se
    # The KL gap is large compared with the noise: an estimator that returned
    # log p(x) (dropping the KL) would fail the check above.
    assert ((mean - log_px).abs() > 5 * se).all(), (mean - log_px) / se


def replicate_losses(elbo, model, guide, x: torch.Tensor, R: int) -> torch.Tensor:
    """R independent values of ``elbo.loss`` (each a negative ELBO summed over x)."""
    return torch.tensor([elbo.loss(model, guide, x) for _ in range(R)])


def test_mean_field_and_mc_kl_agree(oracle_and_data):
    oracle, x = oracle_and_data
    guide = PosteriorGuide(oracle, shift=0.3, scale=1.4, diagonal=True)
    R, P = 50, 800
    opts = dict(num_particles=P, vectorize_particles=True, max_plate_nesting=1)
    mc = replicate_losses(Trace_ELBO(**opts), oracle, guide, x, R)
    mf = replicate_losses(TraceMeanField_ELBO(**opts), oracle, guide, x, R)
    mc_mean, mc_se = mc.mean().item(), mc.std().item() / R**0.5
    mf_mean, mf_se = mf.mean().item(), mf.std().item() / R**0.5
    se = (mc_se**2 + mf_se**2) ** 0.5
    assert 0 < se < 0.05, (mc_se, mf_se)
    assert abs(mc_mean - mf_mean) < 5 * se, (mc_mean, mf_mean, se)

    with torch.no_grad():
        exact_loss = -(oracle.log_px(x) - exact_kl(guide, oracle, x)).sum().item()
        neg_log_px = -oracle.log_px(x).sum().item()
    assert abs(mc_mean - exact_loss) < 5 * mc_se, (mc_mean, exact_loss, mc_se)
    assert abs(mf_mean - exact_loss) < 5 * mf_se, (mf_mean, exact_loss, mf_se)
    # The KL term is detected by both estimators.
    assert abs(mc_mean - neg_log_px) > 5 * mc_se
    assert abs(mf_mean - neg_log_px) > 5 * mf_se


@pytest.mark.parametrize(
    "elbo",
    [
        Trace_ELBO(),
        Trace_ELBO(num_particles=7, vectorize_particles=True, max_plate_nesting=1),
        TraceMeanField_ELBO(),
    ],
    ids=["trace", "trace-vectorized", "meanfield"],
)
def test_loss_equals_differentiable_loss(oracle_and_data, elbo):
    # max_plate_nesting is given for the vectorized ELBO: otherwise its first call
    # guesses it by running the model once, which draws from the RNG, and the two
    # calls below would no longer see the same random numbers.
    oracle, x = oracle_and_data
    guide = PosteriorGuide(oracle, shift=0.3, scale=1.4, diagonal=True)
    pyro.set_rng_seed(7)
    loss = elbo.loss(oracle, guide, x)
    pyro.set_rng_seed(7)
    diff_loss = elbo.differentiable_loss(oracle, guide, x)
    assert diff_loss.requires_grad
    assert diff_loss.item() == loss
    # A different seed gives a different value, so the equality is not vacuous.
    pyro.set_rng_seed(8)
    assert elbo.loss(oracle, guide, x) != loss
