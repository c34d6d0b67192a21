"""Every registered likelihood: shapes, closed-form densities, floors, data checks.

Each density is compared with its formula written out by hand in float64 (the
discretized logistic also with a 50-digit ``decimal`` reference at extreme
parameters); learned scales are checked against their floors and for gradients; and
every registry entry is built into a VAE whose ELBO must be finite under Pyro's
validation, with and without vectorized particles.
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch.nn import functional as F

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.errors import ConfigError
from pyro_vae.models.discretized import DiscretizedLogistic
from pyro_vae.models.likelihoods import (
    BETA_EPS,
    LIKELIHOODS,
    ClampedBeta,
    PixelGaussianLikelihood,
)

D, N, P = 6, 4, 3
FLOOR = 1e-3
OPTIONS = {"data_dim": D, "sigma": 0.7, "sigma_floor": FLOOR}
REAL_LINE = {"gaussian", "gaussian-learned", "gaussian-pixel", "gaussian-decoder"}
REAL_LINE |= {"laplace"}
UNIT_INTERVAL = {"continuous-bernoulli", "beta", "discretized-logistic"}
LOG_2PI = math.log(2 * math.pi)


def make(name: str):
    return LIKELIHOODS[name](**OPTIONS)


def grid_data(n: int = N, seed: int = 1) -> torch.Tensor:
    """8-bit intensities k/255 with both edge bins present: valid for all but one."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, D), generator=gen).to(torch.float64) / 255
    x[0, 0], x[-1, -1] = 0.0, 1.0
    return x


def suitable_data(name: str, n: int = N) -> torch.Tensor:
    x = grid_data(n)
    return (x > 0.5).to(x) if name == "bernoulli" else x


def decoder_output(name: str, *batch: int, scale: float = 1.0) -> torch.Tensor:
    k = LIKELIHOODS[name](**OPTIONS).params_per_feature
    return scale * torch.randn(*batch, k * D)


def normal_log_prob(x, loc, sigma):
    return (-0.5 * ((x - loc) / sigma) ** 2 - torch.log(sigma) - 0.5 * LOG_2PI).sum(-1)


# --- shapes -------------------------------------------------------------------------


def test_registry_has_every_likelihood():
    assert set(LIKELIHOODS) == REAL_LINE | UNIT_INTERVAL | {"bernoulli"}


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_shapes_with_and_without_particles(name):
    lik = make(name)
    x = suitable_data(name)
    for batch in [(N,), (P, N)]:
        px = lik(decoder_output(name, *batch))
        assert px.event_shape == (D,) and px.batch_shape == batch
        assert px.log_prob(x).shape == batch
        assert torch.isfinite(px.log_prob(x)).all()
        assert px.mean.shape == (*batch, D) and torch.isfinite(px.mean).all()
        assert px.sample().shape == (*batch, D)
        assert px.sample((2,)).shape == (2, *batch, D)
        wide = px.expand((2, *batch))  # what a broadcasting plate would do
        assert type(wide.base_dist) is type(px.base_dist)
        torch.testing.assert_close(wide.log_prob(x)[1], px.log_prob(x))
        if name in UNIT_INTERVAL:
            for value in (px.mean, px.sample()):
                assert ((value >= 0) & (value <= 1)).all()


# --- closed forms -------------------------------------------------------------------


def test_gaussian_pixel_density_and_init():
    lik = make("gaussian-pixel")
    torch.testing.assert_close(lik.sigma, torch.full((D,), 0.7), rtol=0, atol=1e-12)
    with torch.no_grad():
        lik.rho.copy_(torch.linspace(-2, 2, D))
    loc, x = torch.randn(P, N, D), torch.randn(N, D)
    sigma = F.softplus(torch.linspace(-2, 2, D)) + FLOOR
    expected = normal_log_prob(x, loc, sigma)
    torch.testing.assert_close(lik(loc).log_prob(x), expected, rtol=0, atol=1e-12)


def test_gaussian_decoder_density_and_init():
    lik = make("gaussian-decoder")
    out = torch.randn(P, N, 2 * D)
    loc, raw = out[..., :D], out[..., D:]
    x = torch.randn(N, D)
    sigma = F.softplus(raw + lik.rho0) + FLOOR
    expected = normal_log_prob(x, loc, sigma)
    torch.testing.assert_close(lik(out).log_prob(x), expected, rtol=0, atol=1e-12)
    # raw scale output 0 gives the initial sigma; the mean is the first block
    at_zero = lik(torch.cat([loc, torch.zeros_like(raw)], -1))
    torch.testing.assert_close(
        at_zero.base_dist.scale, torch.full_like(raw, 0.7), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(lik(out).mean, loc, rtol=0, atol=0)


def test_laplace_density_and_init():
    lik = make("laplace")
    assert lik.scale.item() == pytest.approx(0.7, abs=1e-12)
    loc, x = torch.randn(P, N, D), torch.randn(N, D)
    b = lik.scale.detach()
    expected = (-(x - loc).abs() / b - torch.log(2 * b)).sum(-1)
    torch.testing.assert_close(lik(loc).log_prob(x), expected, rtol=0, atol=1e-12)


def cb_log_norm(lam: torch.Tensor) -> torch.Tensor:
    """C(lambda) = log(2 atanh(1 - 2 lambda) / (1 - 2 lambda)); C(1/2) = log 2."""
    y = 1 - 2 * lam
    safe = torch.where(y == 0, torch.ones_like(y), y)
    return torch.where(y == 0, math.log(2.0), torch.log(2 * torch.atanh(safe) / safe))


@pytest.mark.parametrize("logit_scale", [3.0, 1e-3, 1e-5])
def test_continuous_bernoulli_includes_its_normalizer(logit_scale):
    logits = logit_scale * torch.randn(P, N, D)  # 1e-5: lambda within 3e-6 of 1/2
    logits[0, 0, 0] = 0.0  # lambda = 1/2 exactly: C = log 2
    x = grid_data()
    lam = torch.sigmoid(logits)
    expected = x * torch.log(lam) + (1 - x) * torch.log1p(-lam) + cb_log_norm(lam)
    actual = make("continuous-bernoulli")(logits).log_prob(x)
    torch.testing.assert_close(actual, expected.sum(-1), rtol=0, atol=1e-10)


@pytest.mark.parametrize("logit", [-4.0, 0.0, 1e-4, 2.5])
def test_continuous_bernoulli_integrates_to_one(logit):
    t = torch.linspace(0, 1, 20001)  # Simpson's rule on [0, 1]
    px = make("continuous-bernoulli")(torch.full((1, D), logit))
    density = px.base_dist.log_prob(t.unsqueeze(-1)).exp()[:, 0]
    w = torch.ones_like(t)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    assert (w * density).sum().item() * (t[1] - t[0]).item() / 3 == pytest.approx(
        1.0, abs=1e-10
    )


def test_beta_clamps_observations_before_the_density():
    lik = make("beta")
    out = torch.randn(P, N, 2 * D)
    a = F.softplus(out[..., :D]) + FLOOR
    b = F.softplus(out[..., D:]) + FLOOR
    x = grid_data()
    x[1, :4] = torch.tensor([0.0, 1.0, 1e-4, 1 - 1e-5])  # all clamped
    xc = x.clamp(BETA_EPS, 1 - BETA_EPS)
    expected = (
        (a - 1) * torch.log(xc)
        + (b - 1) * torch.log1p(-xc)
        + torch.lgamma(a + b)
        - torch.lgamma(a)
        - torch.lgamma(b)
    ).sum(-1)
    px = lik(out)
    assert isinstance(px.base_dist, ClampedBeta)
    torch.testing.assert_close(px.log_prob(x), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(px.mean, a / (a + b), rtol=0, atol=1e-12)
    # validation admits the closed interval but still rejects values outside it
    with pytest.raises(ValueError):
        px.log_prob(x + 1.0)


def sigmoid_difference(mu: float, s: float, k: torch.Tensor) -> torch.Tensor:
    """P(k/255) straight from the definition, in float64.

    Above the mean it uses sigma(a) - sigma(b) = sigma(-b) - sigma(-a), so that
    neither side rounds to 1 (1 - sigma(b) is sigma(-b)).
    """
    a, b = ((k + 0.5) / 255 - mu) / s, ((k - 0.5) / 255 - mu) / s
    middle = torch.where(
        b > 0,
        torch.sigmoid(-b) - torch.sigmoid(-a),
        torch.sigmoid(a) - torch.sigmoid(b),
    )
    return torch.where(
        k == 0, torch.sigmoid(a), torch.where(k == 255, torch.sigmoid(-b), middle)
    )


@pytest.mark.parametrize("mu,s", [(0.3, 0.1), (0.5, 0.01), (-0.2, 0.3), (0.9, 2.0)])
def test_discretized_logistic_matches_sigmoid_difference(mu, s):
    k = torch.arange(256.0)
    log_p = DiscretizedLogistic(torch.tensor(mu), torch.tensor(s)).log_prob(k / 255)
    expected = sigmoid_difference(mu, s, k).log()
    assert torch.isfinite(expected).all()  # moderate parameters: no underflow
    torch.testing.assert_close(log_p, expected, rtol=1e-10, atol=1e-12)


def decimal_log_p(mu: float, s: float, k: int) -> float:
    """log P(k/255) to 50 digits, from the same float mu and s.

    With A = exp(a), B = exp(b): sigma(a) - sigma(b) = (A - B) / ((1 + A)(1 + B)),
    a form with no cancellation between probabilities near 1.
    """
    with localcontext() as ctx:
        ctx.prec, ctx.Emax, ctx.Emin = 50, 10**12, -(10**12)
        A = ((Decimal(k) + Decimal("0.5")) / 255 - Decimal(mu)) / Decimal(s)
        B = ((Decimal(k) - Decimal("0.5")) / 255 - Decimal(mu)) / Decimal(s)
        A, B = A.exp(), B.exp()
        if k == 0:
            return float((A / (1 + A)).ln())
        if k == 255:
            return float((1 / (1 + B)).ln())
        return float(((A - B) / ((1 + A) * (1 + B))).ln())


EXTREMES = [(-3.0, 1e-3), (4.0, 1e-3), (0.5, 1e-9), (0.31, 1e-6), (0.5, 50.0)]


@pytest.mark.parametrize("mu,s", EXTREMES + [(0.3, 0.1)])
def test_discretized_logistic_sums_to_one_and_stays_accurate(mu, s):
    k = torch.arange(256.0)
    log_p = DiscretizedLogistic(torch.tensor(mu), torch.tensor(s)).log_prob(k / 255)
    assert torch.isfinite(log_p).all()  # no bin underflows to -inf
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-10)
    for kk in [0, 1, 77, 128, 254, 255]:
        assert log_p[kk].item() == pytest.approx(
            decimal_log_p(mu, s, kk), rel=1e-11, abs=1e-11
        )


def test_discretized_logistic_samples_and_mean():
    px = DiscretizedLogistic(torch.tensor([0.4, -1.0, 3.0]), torch.tensor(0.02))
    x = px.sample((4000,))
    assert x.shape == (4000, 3)
    torch.testing.assert_close(x * 255, torch.round(x * 255), rtol=0, atol=1e-9)
    assert (x[:, 1] == 0).all() and (x[:, 2] == 1).all()
    torch.testing.assert_close(px.mean, torch.tensor([0.4, 0.0, 1.0]))
    # the sample frequencies of the first component follow the bin probabilities
    bins = torch.arange(256.0) / 255
    prob = px.log_prob(bins.unsqueeze(-1))[:, 0].exp()
    freq = torch.bincount(torch.round(x[:, 0] * 255).long(), minlength=256) / 4000
    se = (prob * (1 - prob) / 4000).sqrt()
    assert ((freq - prob).abs() <= 5 * se + 1e-12).all()


# --- floors and gradients -----------------------------------------------------------


def test_gaussian_pixel_floor_and_gradient():
    lik = make("gaussian-pixel")
    assert lik.rho.shape == (D,)
    x = torch.randn(N, D)
    (-lik(torch.zeros(P, N, D)).log_prob(x).sum()).backward()
    assert lik.rho.grad.shape == (D,) and (lik.rho.grad.abs() > 0).all()
    with torch.no_grad():
        lik.rho.fill_(-1e3)
    assert (lik.sigma >= FLOOR).all()
    assert torch.isfinite(lik(torch.zeros(N, D)).log_prob(x)).all()


@pytest.mark.parametrize("name", ["gaussian-decoder", "beta", "discretized-logistic"])
def test_decoder_predicted_scales_respect_the_floor(name):
    lik = make(name)
    out = torch.full((P, N, 2 * D), -1e3)
    out[..., :D] = 0.5  # the location block (beta: alpha is floored too)
    base = lik(out).base_dist
    scales = {
        "gaussian-decoder": lambda: [base.scale],
        "beta": lambda: [base.concentration1, base.concentration0],
        "discretized-logistic": lambda: [base.scale],
    }[name]()
    assert all((scale >= FLOOR).all() for scale in scales)
    x = grid_data()
    assert torch.isfinite(lik(out).log_prob(x)).all()


@pytest.mark.parametrize("name", ["gaussian-decoder", "beta", "discretized-logistic"])
def test_decoder_predicted_scales_get_gradients(name):
    lik = make(name)
    out = torch.randn(P, N, 2 * D, requires_grad=True)
    lik(out).log_prob(grid_data()).sum().backward()
    assert (out.grad[..., D:].abs() > 0).all()  # the second block: scales
    assert (out.grad[..., :D].abs() > 0).all()


def test_laplace_floor_and_gradient():
    lik = make("laplace")
    lik(torch.zeros(N, D)).log_prob(torch.randn(N, D)).sum().backward()
    assert lik.rho.grad.abs() > 0
    with torch.no_grad():
        lik.rho.fill_(-1e3)
    assert lik.scale.item() >= FLOOR


def test_bad_scale_options_are_refused():
    with pytest.raises(ValueError, match="data_dim"):
        LIKELIHOODS["gaussian-pixel"](sigma=0.5)
    for name in ["gaussian-pixel", "gaussian-decoder", "laplace"]:
        with pytest.raises(ValueError, match="--sigma-floor"):
            LIKELIHOODS[name](data_dim=D, sigma=1e-3, sigma_floor=1e-3)
    with pytest.raises(ValueError):
        PixelGaussianLikelihood(0)
    cfg = FitConfig(likelihood="laplace", sigma=0.01, sigma_floor=0.1)
    with pytest.raises(ConfigError, match="floor"):
        build_model_and_guide(cfg, D)


# --- check_data ---------------------------------------------------------------------

BAD_DATA = [
    (name, bad, "[0, 1]", fix)
    for name in sorted(UNIT_INTERVAL)
    for bad, fix in [(1.5, "--likelihood"), (-0.2, "--likelihood")]
] + [("discretized-logistic", 0.5001, "k/255", "uint8")]


@pytest.mark.parametrize("name,bad,problem,fix", BAD_DATA)
def test_check_data_names_the_problem_and_the_fix(name, bad, problem, fix):
    x = grid_data()
    x[1, 2] = bad
    with pytest.raises(ValueError) as err:
        make(name).check_data(x)
    message = str(err.value)
    assert name in message and problem in message and fix in message
    assert f"{bad:.6g}" in message or "off" in message  # the value range found


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_data_rejects_non_finite_values(name, bad):
    x = suitable_data(name)
    x[0, 1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        make(name).check_data(x)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_check_data_accepts_valid_data(name):
    make(name).check_data(suitable_data(name))
    if name in REAL_LINE:
        make(name).check_data(torch.tensor([[-3.7, 12.0, 0.5, 0.1, 0.0, 1e6]]))


def test_discretized_check_tolerates_rounding_of_the_grid():
    x = grid_data()
    make("discretized-logistic").check_data((x * 255).float().double() / 255)
    make("discretized-logistic").check_data(x + 5e-7 * (x < 1))


# --- inside a VAE -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_every_likelihood_builds_and_has_a_finite_elbo(name):
    cfg = FitConfig(likelihood=name, latent_dim=2, hidden=(8,))
    model, guide = build_model_and_guide(cfg, D)
    x = suitable_data(name, n=5)
    model.likelihood.check_data(x)

    loss = Trace_ELBO().differentiable_loss(model, guide, x)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    for p in [*model.parameters(), *guide.parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all()

    pyro.set_rng_seed(1)
    elbo = Trace_ELBO(num_particles=P, vectorize_particles=True, max_plate_nesting=1)
    assert torch.isfinite(elbo.differentiable_loss(model, guide, x))
    # reconstructions are drawn from the likelihood's mean
    with torch.no_grad():
        mean = model.likelihood(model.decoder(torch.zeros(5, 2))).mean
    assert mean.shape == (5, D) and torch.isfinite(mean).all()
