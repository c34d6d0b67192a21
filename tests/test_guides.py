"""The guides q(z|x): structure, densities, gradients, and exactness on the oracle.

Every registered guide is traced alone and inside a particle plate, and its site,
shapes and log-densities are checked against ``posterior(x)``, hand-built
distributions and, for the flow, a change of variables done by hand. Then each guide
is trained on the linear-Gaussian oracle (the model fixed, only the guide learns)
and the importance-sampled log p̂(x) is compared with the exact log p(x) within 5 of
its own standard errors; the ELBO gap is compared with the exact KL where there is
one.
"""

from __future__ import annotations

import functools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import constraints, kl_divergence

from pyro_vae.evaluate import log_marginal
from pyro_vae.guides import (
    ENCODERS,
    GUIDES,
    DiagonalNormalGuide,
    FlowGuide,
    FullRankNormalGuide,
    LowRankNormalGuide,
)
from pyro_vae.models import LinearGaussian
from pyro_vae.nn import mlp

D, d, N, P = 5, 3, 4, 7
OPTIONS = {"rank": 2, "flow_steps": 2, "hidden": (16,), "activation": "relu"}


def make_encoder(out_features: int, data_dim: int = D) -> nn.Module:
    return mlp(data_dim, (16,), out_features)


def make_guide(name: str, latent_dim: int = d, **options) -> nn.Module:
    return GUIDES[name](make_encoder, latent_dim, **{**OPTIONS, **options})


def make_x(n: int = N, data_dim: int = D) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, data_dim, generator=gen, dtype=torch.float64)


def trace_z(guide: nn.Module, x: torch.Tensor, particles: int | None = None) -> dict:
    """The guide's "z" site (log_prob computed), optionally in a particle plate."""
    if particles is None:
        trace = poutine.trace(guide).get_trace(x)
    else:
        with pyro.plate("particles", particles, dim=-2):
            trace = poutine.trace(guide).get_trace(x)
    trace.compute_log_prob()
    sample_sites = [
        n
        for n, s in trace.nodes.items()
        if s["type"] == "sample" and not site_is_subsample(s)
    ]
    assert sample_sites == ["z"]
    return trace.nodes["z"]


class Fixed(nn.Module):
    """An "encoder" that returns the same raw outputs for any x."""

    def __init__(self, raw: torch.Tensor) -> None:
        super().__init__()
        self.raw = raw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw.expand(*x.shape[:-1], self.raw.shape[-1])


# ---------------------------------------------------------------- structure


def test_registry_names():
    assert {"diagonal", "lowrank", "fullrank", "flow"} <= set(GUIDES)


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_site_and_shapes(name):
    guide, x = make_guide(name), make_x()
    site = trace_z(guide, x)
    assert site["fn"].event_dim == 1
    assert site["fn"].batch_shape == (N,)
    assert site["value"].shape == (N, d)
    assert site["log_prob"].shape == (N,)
    q = guide.posterior(x)
    assert (q.batch_shape, q.event_shape) == ((N,), (d,))


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_particle_plate_shapes(name):
    site = trace_z(make_guide(name), make_x(), particles=P)
    assert site["value"].shape == (P, N, d)
    assert site["log_prob"].shape == (P, N)
    assert torch.isfinite(site["log_prob"]).all()


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_conv_encoder(name):
    make_conv = functools.partial(
        ENCODERS["conv"], (8, 8), hidden=(16,), activation="relu"
    )
    guide = GUIDES[name](make_conv, d, **OPTIONS)
    site = trace_z(guide, make_x(data_dim=64), particles=P)
    assert site["value"].shape == (P, N, d)
    assert site["log_prob"].shape == (P, N)


@pytest.mark.parametrize("name", sorted(GUIDES))
@pytest.mark.parametrize("particles", [None, P])
def test_traced_log_prob_equals_posterior_log_prob(name, particles):
    """A fresh q(z|x) gives the traced value the traced density (the flow inverts)."""
    guide, x = make_guide(name), make_x()
    site = trace_z(guide, x, particles)
    with torch.no_grad():
        fresh = guide.posterior(x).log_prob(site["value"])
    torch.testing.assert_close(site["log_prob"].detach(), fresh, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_gradients_reach_every_parameter(name):
    guide, x = make_guide(name), make_x()
    site = trace_z(guide, x, particles=P)
    # the path through z (reparameterization) and the density, as in an ELBO
    (site["value"].square().sum() + site["log_prob"].sum()).backward()
    params = dict(guide.named_parameters())
    assert params
    if name == "flow":
        assert any(key.startswith("transforms.") for key in params)
    for key, param in params.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, key


def test_factories_refuse_options_they_do_not_take():
    for name in GUIDES:
        with pytest.raises(TypeError, match="does not take another, unused"):
            make_guide(name, unused=1, another="x")


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_one_latent_dimension(name):
    site = trace_z(make_guide(name, latent_dim=1, rank=1), make_x(), particles=P)
    assert site["value"].shape == (P, N, 1)
    assert torch.isfinite(site["log_prob"]).all()


# ------------------------------------------------------- Gaussian densities


def test_lowrank_density_is_the_hand_built_mvn():
    guide, x = make_guide("lowrank"), make_x()
    q = guide.posterior(x)
    loc, factor, cov_diag = guide.encode(x)
    assert factor.shape == (N, d, OPTIONS["rank"])
    cov = factor @ factor.mT + torch.diag_embed(cov_diag)
    hand = dist.MultivariateNormal(loc, covariance_matrix=cov)
    z = q.sample((P,))
    torch.testing.assert_close(q.log_prob(z), hand.log_prob(z), rtol=0, atol=1e-10)


def test_lowrank_with_zero_factor_is_the_diagonal_guide():
    raw = make_x(1, 2 * d)
    zero_factor = torch.zeros(1, d * 2)
    lowrank = LowRankNormalGuide(
        Fixed(torch.cat([raw[:, :d], zero_factor, raw[:, d:]], -1)), d
    )
    diagonal = DiagonalNormalGuide(Fixed(raw), d)
    x = make_x()
    z = torch.randn(P, N, d)
    torch.testing.assert_close(
        lowrank.posterior(x).log_prob(z),
        diagonal.posterior(x).log_prob(z),
        rtol=0,
        atol=1e-10,
    )


def test_fullrank_density_is_the_hand_built_mvn():
    guide, x = make_guide("fullrank"), make_x()
    q = guide.posterior(x)
    loc, scale_tril = guide.encode(x)
    assert constraints.lower_cholesky.check(scale_tril).all()
    raw = guide.encoder(x)
    # the layout: mu, the diagonal's softplus-inputs, the strict lower triangle
    assert torch.equal(loc, raw[:, :d])
    rows, cols = torch.tril_indices(d, d, -1)
    assert torch.equal(scale_tril[:, rows, cols], raw[:, 2 * d :])
    cov = scale_tril @ scale_tril.mT
    hand = dist.MultivariateNormal(loc, covariance_matrix=cov)
    z = q.sample((P,))
    torch.testing.assert_close(q.log_prob(z), hand.log_prob(z), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["lowrank", "fullrank"])
@pytest.mark.parametrize("pattern", ["plus", "minus", "mixed"])
def test_covariance_positive_definite_for_extreme_encoder_outputs(name, pattern):
    """Raw outputs of ±1e3: the floor keeps the covariance positive definite."""
    width = {
        "lowrank": LowRankNormalGuide.out_features(d, 2),
        "fullrank": FullRankNormalGuide.out_features(d),
    }[name]
    signs = {
        "plus": torch.ones(width),
        "minus": -torch.ones(width),
        "mixed": torch.randn(width, generator=torch.Generator().manual_seed(3)).sign(),
    }[pattern]
    raw = 1e3 * signs.double()
    guide = (
        LowRankNormalGuide(Fixed(raw), d, rank=2)
        if name == "lowrank"
        else FullRankNormalGuide(Fixed(raw), d)
    )
    q = guide.posterior(make_x())
    floor = guide.scale_floor
    if name == "lowrank":
        assert (guide.encode(make_x())[2] >= floor**2).all()
    else:
        diagonal = q.scale_tril.diagonal(dim1=-2, dim2=-1)
        assert constraints.lower_cholesky.check(q.scale_tril).all()
        assert (diagonal >= floor).all()
    assert torch.linalg.cholesky_ex(q.covariance_matrix).info.eq(0).all()
    z = q.rsample((P,))
    assert torch.isfinite(z).all() and torch.isfinite(q.log_prob(z)).all()


@pytest.mark.parametrize("name", ["lowrank", "fullrank"])
def test_closed_form_kl_status(name):
    """KL against a MultivariateNormal prior is registered, against Independent not."""
    q = make_guide(name).posterior(make_x())
    mvn_prior = dist.MultivariateNormal(torch.zeros(d), torch.eye(d))
    assert torch.isfinite(kl_divergence(q, mvn_prior)).all()
    with pytest.raises(NotImplementedError):
        kl_divergence(q, dist.Normal(torch.zeros(d), 1.0).to_event(1))


# ----------------------------------------------------------------- the flow


def test_flow_log_prob_is_the_change_of_variables_by_hand():
    """One IAF step: invert z -> z0 by hand, log q = log N(z0) - sum log s(z0, h)."""
    guide, x = make_guide("flow", flow_steps=1), make_x()
    site = trace_z(guide, x, particles=P)
    z = site["value"].detach()
    # the value Pyro drew is the one its transform cached: log_prob used no inverse
    assert site["fn"].transforms[-1]._cached_x_y[1] is site["value"]
    torch.testing.assert_close(site["log_prob"], site["fn"].log_prob(site["value"]))
    with torch.no_grad():
        loc, scale, context = guide.encode(x)
        arn = guide.transforms[0].nn
        z0 = torch.zeros_like(z)
        for _ in range(d):  # autoregressive: coordinate i is right after i passes
            shift, log_s = arn(z0, context=context)
            z0 = (z - shift) * torch.exp(-log_s.clamp(-5.0, 3.0))
        shift, log_s = arn(z0, context=context)
        log_s = log_s.clamp(-5.0, 3.0)
        torch.testing.assert_close(torch.exp(log_s) * z0 + shift, z)
        by_hand = dist.Normal(loc, scale).log_prob(z0).sum(-1) - log_s.sum(-1)
    torch.testing.assert_close(site["log_prob"].detach(), by_hand, rtol=0, atol=1e-10)


def test_flow_context_is_shared_across_particles():
    """The context h(x) broadcasts over particles: each row sees its own datum."""
    guide, x = make_guide("flow"), make_x()
    site = trace_z(guide, x, particles=P)
    fresh = torch.stack(
        [
            guide.posterior(x[n : n + 1]).log_prob(site["value"][:, n : n + 1])
            for n in range(N)
        ],
        dim=1,
    )[..., 0]
    torch.testing.assert_close(
        site["log_prob"].detach(), fresh.detach(), rtol=0, atol=1e-10
    )


def test_flow_steps_alternate_the_autoregressive_order():
    guide = make_guide("flow", flow_steps=3)
    orders = [t.nn.permutation.tolist() for t in guide.transforms]
    assert orders == [[0, 1, 2], [2, 1, 0], [0, 1, 2]]
    assert "transforms.1.nn.permutation" in guide.state_dict()


def test_flow_without_steps_is_the_diagonal_guide():
    pyro.set_rng_seed(0)
    flow = make_guide("flow", flow_steps=0)
    assert isinstance(flow, FlowGuide) and flow.context_dim == 0
    assert not list(flow.transforms)
    diagonal = GUIDES["diagonal"](make_encoder, d)
    diagonal.load_state_dict(flow.state_dict())  # same encoder, the same weights
    x = make_x()
    pyro.set_rng_seed(1)
    site_flow = trace_z(flow, x, particles=P)
    pyro.set_rng_seed(1)
    site_diag = trace_z(diagonal, x, particles=P)
    torch.testing.assert_close(site_flow["value"], site_diag["value"], rtol=0, atol=0)
    torch.testing.assert_close(
        site_flow["log_prob"], site_diag["log_prob"], rtol=0, atol=1e-12
    )


# --------------------------------------------------- exactness on the oracle

ORACLE_D, ORACLE_d, ORACLE_N, SIGMA = 5, 2, 8, 0.5
STEPS, PARTICLES, LR = 400, 32, 0.02
K = 2000


def oracle_and_data() -> tuple[LinearGaussian, torch.Tensor]:
    """pPCA with seeded random W, b; its parameters frozen; N data drawn from it."""
    gen = torch.Generator().manual_seed(1234)
    shape = {"dtype": torch.float64, "generator": gen}
    weight = torch.randn(ORACLE_D, ORACLE_d, **shape)
    bias = torch.randn(ORACLE_D, **shape)
    z = torch.randn(ORACLE_N, ORACLE_d, **shape)
    x = z @ weight.T + bias + SIGMA * torch.randn(ORACLE_N, ORACLE_D, **shape)
    return LinearGaussian(weight, bias, SIGMA).requires_grad_(False), x


@functools.cache
def trained(name: str) -> tuple[LinearGaussian, nn.Module, torch.Tensor]:
    """A guide trained by Trace_ELBO and Adam on the oracle; cached per name.

    Deterministic (it reseeds), so the tests that share it do not depend on order.
    """
    assert torch.get_default_dtype() == torch.float64
    pyro.set_rng_seed(0)
    oracle, x = oracle_and_data()
    guide = GUIDES[name](
        lambda out: mlp(ORACLE_D, (32,), out), ORACLE_d, rank=1, flow_steps=2
    )
    elbo = Trace_ELBO(
        num_particles=PARTICLES, vectorize_particles=True, max_plate_nesting=1
    )
    loss_fn = elbo(oracle, guide)
    optimizer = torch.optim.Adam(guide.parameters(), lr=LR)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.02 ** (i / STEPS))
    with pyro.validation_enabled(False):  # checked by the structure tests; slow here
        for _ in range(STEPS):
            optimizer.zero_grad()
            loss_fn(x).backward()
            optimizer.step()
            decay.step()
    return oracle, guide, x


def mean_field_kl(oracle: LinearGaussian, x: torch.Tensor) -> torch.Tensor:
    """min over diagonal Gaussians q of KL(q || p(z|x)), per datum.

    The best q has the posterior mean and precisions diag(Λ), Λ the posterior
    precision, so the KL is (Σ_i log Λ_ii - log det Λ) / 2.
    """
    precision = torch.linalg.inv(oracle.posterior(x).covariance_matrix[0])
    kl = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    return kl.expand(len(x))


def evaluate(name: str):
    oracle, guide, x = trained(name)
    with torch.no_grad():
        result = log_marginal(oracle, guide, x, k=K, seed=0)
        exact = oracle.log_px(x)
    z_scores = (result.log_px - exact) / result.log_px_se
    return oracle, guide, x, result, exact, z_scores


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_trained_guide_log_marginal_matches_exact(name):
    oracle, guide, x, result, exact, z_scores = evaluate(name)
    assert (result.log_px_se < 0.05).all()  # the comparison can fail
    assert z_scores.abs().max() < 5, z_scores
    gap_se = (result.log_px_se.square() + result.elbo_se.square()).sqrt()
    best = mean_field_kl(oracle, x) if name == "diagonal" else torch.zeros(len(x))
    # the gap estimates KL(q || p(z|x)) >= best, and training got close to best
    assert (result.gap > best - 5 * gap_se).all(), result.gap
    assert result.gap.mean() < best.mean() + 0.02, result.gap


def test_flow_guide_still_gives_the_exact_log_marginal():
    """The issue: with an IAF guide, importance-sampled log p̂(x) is exact."""
    oracle, guide, x, result, exact, z_scores = evaluate("flow")
    assert isinstance(guide, FlowGuide) and len(guide.transforms) == 2
    assert (result.log_px_se < 0.05).all()
    assert z_scores.abs().max() < 5, z_scores
    torch.testing.assert_close(result.log_px, exact, rtol=0, atol=0.05)
    # and the flow is more than a diagonal Normal: it beats the best one's KL
    assert result.gap.mean() < 0.5 * mean_field_kl(oracle, x).mean()


def test_fullrank_guide_reaches_the_exact_posterior():
    """Full rank can represent p(z|x) exactly: the KL goes to 0, ELBO to log p(x)."""
    oracle, guide, x, result, exact, _ = evaluate("fullrank")
    with torch.no_grad():
        kl = kl_divergence(guide.posterior(x), oracle.posterior(x))
    assert kl.max() < 0.02, kl
    assert (result.elbo <= exact + 5 * result.elbo_se).all()
    assert (exact - result.elbo).mean() < 0.02


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda e: DiagonalNormalGuide(e, 0), "latent_dim must be a positive"),
        (lambda e: FullRankNormalGuide(e, 3, scale_floor=0.0), "scale_floor must"),
        (lambda e: LowRankNormalGuide(e, 3, rank=0), "rank must be a positive"),
        (lambda e: FlowGuide(e, 3, flow_steps=-1), "flow_steps must be non-neg"),
        (lambda e: FlowGuide(e, -2), "latent_dim must be a positive"),
    ],
)
def test_guides_refuse_impossible_sizes_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make(nn.Identity())
