"""Learnable priors learn under MMD: pathwise mixture draws, and a warning otherwise.

* ``ReparameterizedMixture.rsample`` draws the component index without gradient,
  then ``rsample`` inside that component: its draws match the mixture's closed-form
  mean and variance (within 5 standard errors, and a wrong mixture fails the same
  check), equal torch's ``sample`` under one seed, and their gradient with respect to
  the means and scales is the pathwise one (d sum(z) / d mu_k = the number of draws
  that chose k).
* Under ``mmd-vae`` (alpha = 1: no KL term, the prior is seen only through its
  draws) every learnable component parameter of each registry prior gets a nonzero
  gradient, equal to central differences of the seeded loss; the mixture weights,
  which a draw cannot reach, are named in a warning, once.
* A prior whose parameters all get gradient, or any prior under a loss with a KL
  term, raises no warning; and the mixture's ``has_rsample`` leaves ``Trace_ELBO``
  exactly as it was.
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.nn import PyroModule
from torch import nn

from pyro_vae.guides import mlp_diagonal_guide
from pyro_vae.losses import infovae_preset
from pyro_vae.models import PRIORS, VAE, BernoulliLikelihood, mlp_decoder
from pyro_vae.models.priors import ReparameterizedMixture
from pyro_vae.training.step import StepLoss

N_DATA, D_DATA, LATENT = 16, 6, 2

# ---------------------------------------------------------------------------------
# 1. The mixture's reparameterized draw
# ---------------------------------------------------------------------------------

WEIGHTS = torch.tensor([0.3, 0.7])
LOCS = [[-1.0, 2.0], [1.5, 0.0]]
SCALES = [[0.5, 1.0], [1.0, 0.3]]


def two_gaussians(weights: torch.Tensor = WEIGHTS):
    """A 2-component mixture in d = 2 whose locs and scales are leaves with grad."""
    locs = torch.tensor(LOCS, requires_grad=True)
    scales = torch.tensor(SCALES, requires_grad=True)
    mixture = ReparameterizedMixture(
        dist.Categorical(probs=weights), dist.Normal(locs, scales).to_event(1)
    )
    return mixture, locs, scales


def closed_form_moments(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean Σ π_k μ_k and variance Σ π_k (σ_k² + μ_k²) - mean², per coordinate."""
    w, mu, sigma = weights[:, None], torch.tensor(LOCS), torch.tensor(SCALES)
    mean = (w * mu).sum(0)
    return mean, (w * (sigma**2 + mu**2)).sum(0) - mean**2


def test_rsample_matches_the_mixtures_mean_and_variance():
    mixture, _, _ = two_gaussians()
    # Through Pyro's expand, as a plate of 50 data does: (draws, 50, d), all i.i.d.
    z = mixture.expand((50,)).rsample((4000,))
    assert z.shape == (4000, 50, 2)
    z = z.detach().reshape(-1, 2)
    n = z.shape[0]
    mean, var = closed_form_moments(WEIGHTS)
    centred = z - z.mean(0)
    m2, m4 = centred.pow(2).mean(0), centred.pow(4).mean(0)
    mean_se, var_se = (m2 / n).sqrt(), ((m4 - m2**2) / n).sqrt()
    assert (mean_se < 0.01).all() and (var_se < 0.02).all()  # the check has teeth
    assert ((z.mean(0) - mean).abs() < 5 * mean_se).all(), (z.mean(0), mean, mean_se)
    assert ((z.var(0) - var).abs() < 5 * var_se).all(), (z.var(0), var, var_se)
    # A draw that ignored the weights (uniform) would be > 5 se off in the mean.
    wrong_mean, _ = closed_form_moments(torch.tensor([0.5, 0.5]))
    assert ((z.mean(0) - wrong_mean).abs() > 5 * mean_se).all()


def test_rsample_is_torchs_sample_with_the_pathwise_gradient():
    mixture, locs, scales = two_gaussians()
    expanded = mixture.expand((30,))
    assert isinstance(expanded, ReparameterizedMixture) and expanded.has_rsample
    pyro.set_rng_seed(3)
    z = expanded.rsample((20,))
    # The same random numbers as torch's own (gradient-free) sample: a seeded draw
    # from the model, e.g. generating from the prior, is unchanged.
    plain = dist.MixtureSameFamily(
        dist.Categorical(probs=WEIGHTS), dist.Normal(locs, scales).to_event(1)
    )
    pyro.set_rng_seed(3)
    assert torch.equal(z, plain.expand((30,)).sample((20,)))
    # The index is drawn first: replaying the seed recovers each draw's component.
    pyro.set_rng_seed(3)
    index = expanded.mixture_distribution.sample((20,))  # (20, 30)
    chose = torch.nn.functional.one_hot(index, 2).to(z.dtype)  # (20, 30, K)
    assert 0 < chose[..., 0].sum() < index.numel()  # both components drawn

    grad_locs, grad_scales = torch.autograd.grad(z.sum(), (locs, scales))
    # d sum(z) / d mu_k = the number of draws that chose k, in every coordinate
    counts = chose.sum((0, 1))
    assert torch.equal(grad_locs, counts[:, None].expand(2, 2))
    # d sum(z) / d sigma_k = the sum of the chosen draws' noise (z - mu_k) / sigma_k
    eps = (z.detach()[..., None, :] - locs.detach()) / scales.detach()  # (.., K, d)
    expected = (chose[..., None] * eps).sum((0, 1))
    torch.testing.assert_close(grad_scales, expected, rtol=1e-12, atol=1e-12)


def test_mixture_weights_get_no_gradient_from_a_draw():
    # The stated limitation: the component choice is discrete.
    logits = torch.zeros(2, requires_grad=True)
    mixture = ReparameterizedMixture(
        dist.Categorical(logits=logits),
        dist.Normal(torch.tensor(LOCS), torch.tensor(SCALES)).to_event(1),
    )
    z = mixture.rsample((5,))
    assert z.shape == (5, 2) and not z.requires_grad


# ---------------------------------------------------------------------------------
# 2. Every registry prior under mmd-vae
# ---------------------------------------------------------------------------------

#: registry prior -> (its options, the parameters no draw can reach)
REGISTRY = {
    "normal": ({}, set()),
    "learned-normal": ({}, set()),
    "mog": ({"components": 3}, {"prior.logits"}),
    "vamp": ({"pseudo_inputs": 4, "data_dim": D_DATA}, set()),
    "student-t": ({}, set()),
}


def small_vae(prior_name: str):
    """A float64 MLP VAE with the registry's prior ``prior_name``, and binary data."""
    guide = mlp_diagonal_guide(D_DATA, LATENT, (8,))
    options = dict(REGISTRY[prior_name][0])
    if prior_name == "vamp":
        options["posterior"] = guide.posterior
    prior = PRIORS[prior_name](latent_dim=LATENT, **options)
    model = VAE(prior, mlp_decoder(LATENT, D_DATA, (8,)), BernoulliLikelihood())
    gen = torch.Generator().manual_seed(11)
    x = torch.bernoulli(torch.full((N_DATA, D_DATA), 0.4), generator=gen)
    return model, guide, x


def backward_recording_warnings(loss, model, guide, x, seed: int = 5):
    """Backward of the seeded loss; the warnings it raised."""
    pyro.set_rng_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss.differentiable_loss(model, guide, x).backward()
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("prior_name", list(REGISTRY))
def test_every_learnable_registry_prior_parameter_learns_under_mmd_vae(prior_name):
    model, guide, x = small_vae(prior_name)
    unreachable = REGISTRY[prior_name][1]
    loss = infovae_preset("mmd-vae", lam=100.0)  # alpha = 1: no KL term
    messages = backward_recording_warnings(loss, model, guide, x)

    params = {f"prior.{n}": p for n, p in model.prior.named_parameters()}
    expected_learnable = {
        "normal": set(),
        "learned-normal": {"prior.loc", "prior.rho"},
        "mog": {"prior.locs", "prior.rhos", "prior.logits"},
        "vamp": {"prior.raw_inputs"},
        "student-t": set(),
    }[prior_name]
    assert set(params) == expected_learnable
    for name, p in params.items():
        if name in unreachable:
            assert p.grad is None or not p.grad.any(), name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    # Only the unreachable ones are warned about, by name, in one warning.
    about_prior = [m for m in messages if "get no gradient" in m]
    if unreachable:
        (message,) = about_prior
        assert all(name in message for name in unreachable), message
        assert not any(n in message for n in set(params) - unreachable), message
        assert "mixture weights" in message and "alpha < 1" in message
    else:
        assert not messages, messages

    # Once per loss object: a second step is silent.
    assert not backward_recording_warnings(loss, model, guide, x, seed=6)


@pytest.mark.parametrize("prior_name", ["mog", "vamp"])
def test_mixture_prior_gradients_are_those_of_the_seeded_loss(prior_name):
    # Under one seed the component indices and the noise are fixed (the indices come
    # from the weights only), so the loss is a smooth function of the component
    # parameters: the pathwise gradient equals its central differences.
    model, guide, x = small_vae(prior_name)
    loss = infovae_preset("mmd-vae", lam=100.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mog's weights: tested above
        pyro.set_rng_seed(5)
        loss.differentiable_loss(model, guide, x).backward()

    def seeded_value() -> float:
        pyro.set_rng_seed(5)
        return loss.loss(model, guide, x)

    names = {"mog": ["locs", "rhos"], "vamp": ["raw_inputs"]}[prior_name]
    h = 1e-5
    for name in names:
        p = getattr(model.prior, name)
        i = p.grad.abs().argmax().item()
        grad = p.grad.view(-1)[i].item()
        with torch.no_grad():
            p.view(-1)[i] += h
            up = seeded_value()
            p.view(-1)[i] -= 2 * h
            down = seeded_value()
            p.view(-1)[i] += h
        assert abs(grad) > 1e-3, (name, grad)
        assert grad == pytest.approx((up - down) / (2 * h), rel=1e-4), name


def test_learned_normal_prior_raises_no_warning():
    model, guide, x = small_vae("learned-normal")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyro.set_rng_seed(5)
        infovae_preset("mmd-vae", lam=100.0).differentiable_loss(
            model, guide, x
        ).backward()
    assert all(p.grad.abs().sum() > 0 for p in model.prior.parameters())


@pytest.mark.parametrize("loss_name", ["elbo", "infovae"])
def test_a_kl_term_trains_the_mixture_weights_without_warning(loss_name):
    # alpha < 1 keeps log p(z) in the objective, and with it the weights' gradient.
    model, guide, x = small_vae("mog")
    loss = infovae_preset(loss_name, alpha=0.5, lam=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyro.set_rng_seed(5)
        loss.differentiable_loss(model, guide, x).backward()
    assert all(p.grad.abs().sum() > 0 for p in model.prior.parameters())


class _SampledMixture(PyroModule):
    """A user's mixture prior as torch gives it: MixtureSameFamily, no rsample."""

    def __init__(self) -> None:
        super().__init__()
        self.locs = nn.Parameter(torch.tensor(LOCS))
        self.log_scales = nn.Parameter(torch.zeros(2, LATENT))

    def forward(self) -> dist.Distribution:
        return dist.MixtureSameFamily(
            dist.Categorical(logits=torch.zeros(2)),
            dist.Normal(self.locs, self.log_scales.exp()).to_event(1),
        )


def test_a_prior_without_rsample_is_warned_about_by_name():
    _, guide, x = small_vae("normal")
    model = VAE(
        _SampledMixture(), mlp_decoder(LATENT, D_DATA, (8,)), BernoulliLikelihood()
    )
    loss = infovae_preset("mmd-vae", lam=100.0)
    with pytest.warns(UserWarning, match="get no gradient") as record:
        pyro.set_rng_seed(5)
        loss.differentiable_loss(model, guide, x).backward()
    (message,) = [str(w.message) for w in record]
    assert "prior.locs" in message and "prior.log_scales" in message
    assert "has no rsample" in message
    # (log p(z) enters -ELBO and alpha log p(z) and cancels: zero, or no gradient)
    assert all(p.grad is None or not p.grad.any() for p in model.prior.parameters())


def untrained_prior_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "get no gradient" in str(w.message)]


def test_the_warning_comes_once_through_the_traced_training_step():
    # train() calls objective(model, guide) through StepLoss: one eager validating
    # call (which checks and warns), then a traced graph (which does not re-check).
    model, guide, x = small_vae("mog")
    step = StepLoss(infovae_preset("mmd-vae", lam=100.0)(model, guide))
    pyro.set_rng_seed(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # torch's own notices on tracing pass too
        for _ in range(3):
            model.prior.locs.grad = None
            step(x).backward()
    (message,) = untrained_prior_warnings(caught)
    assert "prior.logits" in message
    assert model.prior.locs.grad.abs().sum() > 0  # the last step reached the prior


def test_the_check_waits_for_an_eager_call_when_the_first_call_is_traced():
    # While torch.jit.trace records the loss the check is skipped (it would freeze
    # a Python branch into the graph); the first eager call does it.
    model, guide, x = small_vae("mog")
    loss = infovae_preset("mmd-vae", lam=100.0)
    loss_fn = loss(model, guide)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(loss_fn, (x,), check_trace=False)
    assert not untrained_prior_warnings(caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_fn(x).backward()
    assert len(untrained_prior_warnings(caught)) == 1


class _PlainMixturePrior(PyroModule):
    """The mog prior's parameters, returned as Pyro's plain MixtureSameFamily."""

    def __init__(self, mog: nn.Module) -> None:
        super().__init__()
        self.mog = mog

    def forward(self) -> dist.Distribution:
        mixture = self.mog()
        return dist.MixtureSameFamily(
            mixture.mixture_distribution, mixture.component_distribution
        )


@pytest.mark.parametrize(
    "particles",
    [{}, {"num_particles": 3, "vectorize_particles": True, "max_plate_nesting": 1}],
    ids=["one", "vectorized"],
)
def test_has_rsample_leaves_trace_elbo_unchanged(particles):
    # Under the ELBO the model's z is replayed from the guide: the mixture's rsample
    # is never called, and value and gradients are those of MixtureSameFamily.
    model, guide, x = small_vae("mog")
    plain = VAE(_PlainMixturePrior(model.prior), model.decoder, model.likelihood)
    params = [*model.parameters(), *guide.parameters()]
    results = []
    for m in (model, plain):
        pyro.set_rng_seed(5)
        loss = Trace_ELBO(**particles).differentiable_loss(m, guide, x)
        results.append((loss, torch.autograd.grad(loss, params)))
    (loss, grads), (plain_loss, plain_grads) = results
    assert loss.item() == plain_loss.item()
    assert all(torch.equal(g, h) for g, h in zip(grads, plain_grads, strict=True))
    (i,) = [i for i, p in enumerate(params) if p is model.prior.logits]
    assert grads[i].any()  # the ELBO's log p(z) trains the weights


@pytest.mark.parametrize("prior_name", ["mog", "vamp"])
def test_the_plates_expanded_prior_draws_one_z_per_datum_and_particle(prior_name):
    # What Trace_InfoVAE draws from: the model trace's fn, expanded by the plates.
    model, _, x = small_vae(prior_name)
    fn = pyro.poutine.trace(model).get_trace(x).nodes["z"]["fn"]
    assert isinstance(fn, ReparameterizedMixture) and fn.batch_shape == (N_DATA,)
    assert fn.rsample().shape == (N_DATA, LATENT)

    def vectorized(x):
        with pyro.plate("particles", 3, dim=-2):
            return model(x)

    fn = pyro.poutine.trace(vectorized).get_trace(x).nodes["z"]["fn"]
    assert isinstance(fn, ReparameterizedMixture) and fn.batch_shape == (3, N_DATA)
    z = fn.rsample()
    assert z.shape == (3, N_DATA, LATENT) and z.requires_grad
