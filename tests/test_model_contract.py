"""The model and guide contracts in code (issue 13, points 3 and 5).

* A prior handed to ``VAE`` as a distribution object becomes a module
  (:class:`~pyro_vae.models.vae.DistributionPrior`): its tensors are buffers, so it is
  in the state dict and follows ``.to(dtype)`` / ``.to(device)``; the rebuilt
  distribution is the original one, log_prob for log_prob; what cannot be rebuilt is
  refused with a message that says to pass a module.
* The model samples without data: ``model(n=N)`` and ``model.sample(N)``, with the
  site ``"x"`` sampled (not observed) inside the plate ``"data"``.
* Every registry guide is an :class:`~pyro_vae.guides.AmortizedGuide` (one shared
  ``forward``) and keeps the :class:`~pyro_vae.nn.HasPosterior` Protocol that the
  VampPrior relies on.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.cli.generate import sample_prior
from pyro_vae.guides import GUIDES, AmortizedGuide, mlp_diagonal_guide
from pyro_vae.models import VAE, LinearGaussian, mlp_decoder
from pyro_vae.models.vae import DistributionPrior
from pyro_vae.nn import HasPosterior, PosteriorFn

d, D, N = 3, 6, 4


def bernoulli(logits: torch.Tensor) -> dist.Distribution:
    return dist.Bernoulli(logits=logits).to_event(1)


def readme_model(prior_kind: str = "normal") -> tuple[VAE, torch.nn.Module]:
    """The README's Python-API example, built as a user would: in float32."""
    if prior_kind == "normal":
        prior = dist.Normal(torch.zeros(d), 1.0).to_event(1)
    else:
        prior = dist.StudentT(4.0, torch.zeros(d), 1.0).to_event(1)
    model = VAE(prior, mlp_decoder(d, D, [16]), bernoulli)
    guide = mlp_diagonal_guide(D, d, [16])
    return model, guide


def binary_data(n: int = N, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 2, (n, D), generator=gen).to(dtype)


# -- 3. a prior given as a distribution follows the model ---------------------------


@pytest.mark.parametrize("prior_kind", ["normal", "student-t"])
def test_readme_example_moved_to_float64_runs(prior_kind):
    torch.set_default_dtype(torch.float32)  # the user's default (conftest restores)
    model, guide = readme_model(prior_kind)
    assert isinstance(model.prior, torch.nn.Module)
    model.to(torch.float64), guide.to(torch.float64)
    x = binary_data(dtype=torch.float64)

    loss = Trace_ELBO().differentiable_loss(model, guide, x)
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    prior = model.prior_dist()
    assert prior.base_dist.loc.dtype == torch.float64
    trace = poutine.trace(model).get_trace(x)
    assert trace.nodes["z"]["value"].dtype == torch.float64
    # in the state dict, so saved and loaded with the model
    state = model.state_dict()
    assert state["prior.base.loc"].dtype == torch.float64
    assert torch.equal(state["prior.base.loc"], torch.zeros(d, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_readme_example_moved_to_cuda_runs():
    torch.set_default_dtype(torch.float32)
    model, guide = readme_model("student-t")
    model.cuda(), guide.cuda()
    x = binary_data(dtype=torch.float32).cuda()
    loss = Trace_ELBO().differentiable_loss(model, guide, x)
    assert loss.is_cuda and torch.isfinite(loss)
    assert model.prior_dist().base_dist.loc.is_cuda
    assert model.sample(5).is_cuda


def test_distribution_prior_is_saved_and_loaded():
    source, _ = readme_model()
    with torch.no_grad():
        source.prior.base.loc += 0.5  # a buffer: it can be changed and saved
    target, _ = readme_model()
    target.load_state_dict(source.state_dict())
    z = torch.randn(N, d)
    assert torch.equal(
        target.prior_dist().log_prob(z),
        dist.Normal(torch.full((d,), 0.5), 1.0).to_event(1).log_prob(z),
    )
    # buffers, not parameters: a fixed prior is not trained
    assert not any(name.startswith("prior.") for name, _ in target.named_parameters())


def _mixture() -> dist.Distribution:
    return dist.MixtureSameFamily(
        dist.Categorical(logits=torch.randn(4)),
        dist.Normal(torch.randn(4, d), torch.rand(4, d) + 0.5).to_event(1),
    )


def _bernoulli_with_both_parameterizations() -> dist.Distribution:
    prior = dist.Bernoulli(probs=torch.rand(d)).to_event(1)
    assert prior.base_dist.logits is not None  # computed and cached: it holds both
    return prior


def _mvn(**kwargs) -> dist.Distribution:
    a = torch.randn(d, d)
    cov = a @ a.T + torch.eye(d)
    if "scale_tril" in kwargs:
        return dist.MultivariateNormal(
            torch.randn(d), scale_tril=torch.linalg.cholesky(cov)
        )
    return dist.MultivariateNormal(torch.randn(d), covariance_matrix=cov)


PRIORS = {
    "normal.to_event": lambda: dist.Normal(torch.zeros(d), 2.0).to_event(1),
    "student-t": lambda: dist.StudentT(4.0, torch.zeros(d), 1.5).to_event(1),
    "laplace": lambda: dist.Laplace(torch.randn(d), torch.rand(d) + 0.1).to_event(1),
    "beta (property arguments)": lambda: dist.Beta(
        torch.rand(d) + 0.5, torch.rand(d) + 0.5
    ).to_event(1),
    "expanded scalar": lambda: dist.Normal(0.0, 1.0).expand([d]).to_event(1),
    "nested to_event": lambda: (
        dist.Normal(torch.zeros(2, d), 1.0).to_event(1).to_event(1)
    ),
    "mvn scale_tril": lambda: _mvn(scale_tril=True),
    "mvn covariance": lambda: _mvn(),
    "lowrank mvn": lambda: dist.LowRankMultivariateNormal(
        torch.zeros(d), torch.randn(d, 2), torch.rand(d) + 0.1
    ),
    "mixture": _mixture,
    "bernoulli probs+logits": _bernoulli_with_both_parameterizations,
}


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_wrapped_prior_is_the_same_distribution(name):
    original = PRIORS[name]()
    model = VAE(original, mlp_decoder(d, D, [8]), bernoulli)
    assert isinstance(model.prior, DistributionPrior)
    rebuilt = model.prior_dist()
    assert type(rebuilt) is type(original)
    assert rebuilt.batch_shape == original.batch_shape
    assert rebuilt.event_shape == original.event_shape
    z = original.sample((N,))
    assert torch.equal(rebuilt.log_prob(z), original.log_prob(z)), name
    model.to(torch.float32)
    assert model.prior_dist().log_prob(z.float()).dtype == torch.float32


def test_a_prior_that_cannot_be_rebuilt_is_refused_with_the_fix():
    flow = dist.TransformedDistribution(
        dist.Normal(torch.zeros(d), 1.0).to_event(1),
        [dist.transforms.AffineTransform(torch.ones(d), 2.0)],
    )
    with pytest.raises(TypeError, match="pass a module"):
        VAE(flow, mlp_decoder(d, D, [8]), bernoulli)
    learnable = dist.Normal(torch.nn.Parameter(torch.zeros(d)), 1.0).to_event(1)
    with pytest.raises(ValueError, match="require grad.*module"):
        VAE(learnable, mlp_decoder(d, D, [8]), bernoulli)


def test_a_module_prior_is_kept_as_it_is():
    model, _ = build_model_and_guide(FitConfig(latent_dim=d, hidden=(8,)), D)
    assert not isinstance(model.prior, DistributionPrior)


# -- 5. the model samples without data ----------------------------------------------


def sampling_models() -> dict[str, torch.nn.Module]:
    vae, _ = build_model_and_guide(FitConfig(latent_dim=d, hidden=(8,)), D)
    gaussian, _ = build_model_and_guide(
        FitConfig(latent_dim=d, hidden=(8,), likelihood="gaussian"), D
    )
    readme, _ = readme_model("student-t")
    pca = LinearGaussian(torch.randn(D, d), torch.zeros(D), 0.5)
    return {"bernoulli": vae, "gaussian": gaussian, "readme": readme, "pPCA": pca}


@pytest.mark.parametrize("name", ["bernoulli", "gaussian", "readme", "pPCA"])
def test_model_samples_without_data(name):
    model = sampling_models()[name]
    draws = model(n=5)
    assert draws.shape == (5, D)
    trace = poutine.trace(model).get_trace(n=5)
    site = trace.nodes["x"]
    assert not site["is_observed"]
    assert torch.isfinite(site["value"]).all()
    assert site["fn"].support.check(site["value"]).all()
    frames = {f.name: f.size for f in trace.nodes["z"]["cond_indep_stack"]}
    assert frames == {"data": 5}
    assert {f.name for f in site["cond_indep_stack"]} == {"data"}

    sample = model.sample(5)
    assert sample.shape == (5, D) and not sample.requires_grad
    assert site["fn"].support.check(sample).all()
    if name == "bernoulli":
        assert set(sample.unique().tolist()) <= {0.0, 1.0}


def test_sampling_needs_data_or_a_count():
    model = sampling_models()["bernoulli"]
    with pytest.raises(ValueError, match="n of draws"):
        model()
    with pytest.raises(ValueError, match="does not match"):
        model(binary_data(4), n=3)
    with pytest.raises(ValueError, match="positive"):
        model(n=0)


def test_sample_prior_uses_the_model_sampling():
    model = sampling_models()["bernoulli"]
    pyro.set_rng_seed(5)
    new = sample_prior(model, 4)
    pyro.set_rng_seed(5)
    old_form = sample_prior(model, torch.zeros(4, D))  # a tensor: only its rows
    assert new.shape == (4, D)
    assert torch.equal(new, old_form)
    assert ((new > 0) & (new < 1)).all()  # Bernoulli means

    def data_only_model(x):  # a user's model that does not sample without data
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
            return pyro.sample(
                "x", dist.Normal(z.sum(-1, True).expand(-1, D), 1.0).to_event(1), obs=x
            )

    assert sample_prior(data_only_model, torch.zeros(3, D)).shape == (3, D)
    with pytest.raises(TypeError, match="cannot sample without data"):
        sample_prior(data_only_model, 3)


# -- 5. the guide contract in code ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_every_registry_guide_is_an_amortized_guide(name):
    cfg = FitConfig(
        guide=name, latent_dim=d, hidden=(8,), prior="vamp", pseudo_inputs=3
    )
    model, guide = build_model_and_guide(cfg, D)
    assert isinstance(guide, AmortizedGuide)
    assert type(guide).forward is AmortizedGuide.forward  # the one shared program
    assert isinstance(guide, HasPosterior)
    assert isinstance(guide.posterior, PosteriorFn)
    q = guide.posterior(binary_data())
    assert q.batch_shape == (N,) and q.event_shape == (d,)
    trace = poutine.trace(guide).get_trace(binary_data())
    assert [f.name for f in trace.nodes["z"]["cond_indep_stack"]] == ["data"]
    # the VampPrior runs on the guide's posterior at its pseudo-inputs
    z = guide(binary_data())
    assert model.prior_dist().log_prob(z).shape == (N,)


def test_the_protocols_accept_any_posterior_and_refuse_what_has_none():
    class Mine:  # a user's guide, not derived from AmortizedGuide
        def posterior(self, x: torch.Tensor) -> dist.Distribution:
            return dist.Normal(torch.zeros(len(x), d), 1.0).to_event(1)

    assert isinstance(Mine(), HasPosterior)
    assert isinstance(Mine().posterior, PosteriorFn)
    assert not isinstance(object(), HasPosterior)
    assert not isinstance(3, PosteriorFn)


def test_the_base_guide_says_what_a_subclass_must_define():
    class NoPosterior(AmortizedGuide):
        pass

    with pytest.raises(NotImplementedError, match="posterior"):
        NoPosterior()(binary_data())
