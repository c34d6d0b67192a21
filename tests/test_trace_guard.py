"""The fast step means what eager Pyro means: what a model reads, it reads each call.

A model of the user's own that reads a Python value (a KL weight raised by a hook)
trains exactly as in eager Pyro by default; the registries' parts are traced, and a
change of their Python state retraces; torch's warnings reach the user.
"""

from __future__ import annotations

import itertools
import warnings

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.data import Splits
from pyro_vae.guides import GUIDES
from pyro_vae.models import LIKELIHOODS, PRIORS, VAE
from pyro_vae.training.loop import Schedule, TrainOptions, make_elbo, train
from pyro_vae.training.step import StepLoss, make_optimizer
from pyro_vae.training.trace_guard import python_state, untraceable_reason


class WarmupVAE(VAE):
    """KL warm-up written the ordinary Pyro way: a scale read from ``self``."""

    kl_weight = 0.1

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=self.kl_weight):
                z = pyro.sample("z", self.prior_dist())
            return pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)


class WarmupGuide(torch.nn.Module):
    def __init__(self, guide, model):
        super().__init__()
        self.inner, self.model = guide, [model]  # the model is not a submodule

    def forward(self, x):
        with poutine.scale(scale=self.model[0].kl_weight):
            return self.inner(x)


def _warmup_parts(seed=0):
    pyro.set_rng_seed(seed)
    cfg = FitConfig(latent_dim=3, hidden=(16,))
    model, guide = build_model_and_guide(cfg, 64, (64,))
    user = WarmupVAE(model.prior, model.decoder, model.likelihood).double()
    return user, WarmupGuide(guide, user).double()


def _train_warmup(jit):
    model, guide = _warmup_parts()
    x = torch.bernoulli(torch.rand(60, 64, generator=torch.Generator().manual_seed(3)))

    def raise_weight(stats):
        model.kl_weight = min(1.0, 0.1 + 0.3 * stats.epoch)

    pyro.set_rng_seed(1)
    train(
        model,
        guide,
        Splits.of(x.double(), x[:20].double()),
        Schedule(epochs=3, batch_size=20, lr=1e-2),
        elbo=make_elbo("trace"),
        options=TrainOptions(jit=jit, on_epoch=raise_weight),
    )
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_a_model_reading_python_state_trains_as_eager_pyro_by_default():
    eager = _train_warmup(jit=False)
    default = _train_warmup(jit="auto")
    assert torch.equal(default, eager)
    # The test can fail: a trace (forced) freezes the weight at its first value.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = _train_warmup(jit=True)
    assert (frozen - eager).abs().max() > 1e-3


def test_a_user_class_is_named_as_the_reason_to_run_eagerly():
    model, guide = _warmup_parts()
    step = StepLoss(make_elbo("trace")(model, guide))
    assert not step.jit
    assert "WarmupVAE" in step.eager_reason


def _registry_configs():
    """Every registry part at least once, with the other parts at their defaults."""
    for prior in PRIORS:
        yield {"prior": prior}
    for likelihood in LIKELIHOODS:
        yield {"likelihood": likelihood}
    for guide, arch in itertools.product(GUIDES, ("mlp", "conv")):
        yield {"guide": guide, "arch": arch}


@pytest.mark.parametrize("options", list(_registry_configs()), ids=str)
def test_every_registry_part_is_traced_and_its_python_state_is_stable(options):
    """Pins that the registries' parts read only guarded Python state."""
    pyro.set_rng_seed(0)
    cfg = FitConfig(
        latent_dim=3, hidden=(16,), pseudo_inputs=4, binarize="none", **options
    )
    model, guide = build_model_and_guide(cfg, 64, (1, 8, 8))
    loss_fn = make_elbo("trace")(model, guide)
    assert untraceable_reason(loss_fn) is None
    before = python_state(loss_fn)
    x = torch.rand(8, 64).clamp(0.05, 0.95).round()  # 0/1, inside every support
    with pyro.validation_enabled(False):
        loss_fn(x)
    assert python_state(loss_fn) == before  # a call changes no Python state


def _gaussian_run(change_sigma, jit):
    pyro.set_rng_seed(0)
    cfg = FitConfig(latent_dim=2, hidden=(8,), likelihood="gaussian", sigma=1.0)
    model, guide = build_model_and_guide(cfg, 16, (16,))
    model, guide = model.double(), guide.double()
    loss_fn = make_elbo("trace")(model, guide)
    step, opt = StepLoss(loss_fn, jit=jit), make_optimizer(loss_fn.parameters(), 1e-2)
    x = torch.rand(10, 16, generator=torch.Generator().manual_seed(2)).double()
    pyro.set_rng_seed(5)
    losses = []
    for i in range(4):
        if change_sigma and i == 2:
            model.likelihood.sigma = 0.25  # a registry part's Python state
        loss = step(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, step


def test_a_changed_attribute_of_a_registry_part_retraces():
    eager, _ = _gaussian_run(True, jit=False)
    traced, step = _gaussian_run(True, jit="auto")
    assert traced == pytest.approx(eager, rel=1e-12)
    assert len(step._graphs) == 2  # one graph per sigma
    unchanged, _ = _gaussian_run(False, jit="auto")
    assert abs(unchanged[3] - traced[3]) > 1.0  # sigma mattered: the test can fail


def test_a_hook_or_lambda_makes_the_step_eager():
    pyro.set_rng_seed(0)
    model, guide = build_model_and_guide(FitConfig(latent_dim=2, hidden=(8,)), 16)
    likelihood = model.likelihood
    del model.likelihood
    model.likelihood = lambda out: likelihood(out)
    assert "function" in untraceable_reason(make_elbo("trace")(model, guide))
    model, guide = build_model_and_guide(FitConfig(latent_dim=2, hidden=(8,)), 16)
    guide.register_forward_hook(lambda *args: None)
    assert "hook" in untraceable_reason(make_elbo("trace")(model, guide))


def _future_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return {str(w.message) for w in caught if issubclass(w.category, FutureWarning)}


def test_torchs_deprecation_warning_passes_through_the_trace():
    pyro.set_rng_seed(0)
    model, guide = build_model_and_guide(FitConfig(latent_dim=2, hidden=(8,)), 16)
    step = StepLoss(make_elbo("trace")(model, guide))
    x = torch.bernoulli(torch.rand(4, 16))
    torch_says = _future_warnings(
        lambda: torch.jit.trace(torch.nn.Linear(2, 2), (torch.ones(1, 2),))
    )
    we_pass_on = _future_warnings(lambda: step(x))
    assert step._graphs
    assert torch_says <= we_pass_on
    if torch_says:  # torch 2.14 deprecates the tracer; the user hears of it
        assert any("torch.jit.trace" in message for message in we_pass_on)


def test_a_user_warning_raised_while_tracing_reaches_the_user():
    class Noisy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def forward(self, x):
            warnings.warn("my model's own note", UserWarning, stacklevel=1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample(
                    "x", pyro.distributions.Normal(self.w, 1.0).to_event(1), obs=x
                )

    step = StepLoss(make_elbo("trace")(Noisy(), lambda x: None), jit=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(torch.randn(4, 3))
        step(torch.randn(4, 3))
    notes = [w for w in caught if "my model's own note" in str(w.message)]
    assert len(notes) >= 2 and step._graphs  # validation's call and the trace's


def _prior_swap_losses(jit):
    pyro.set_rng_seed(0)
    model, guide = build_model_and_guide(FitConfig(latent_dim=2, hidden=(8,)), 16)
    step = StepLoss(make_elbo("trace")(model, guide), jit=jit)
    x = torch.bernoulli(torch.rand(6, 16, generator=torch.Generator().manual_seed(4)))
    pyro.set_rng_seed(9)
    losses = [step(x).item()]
    model.prior.loc = torch.full((2,), 3.0)  # a new tensor, not an in-place update
    losses += [step(x).item(), step(x).item()]
    return losses, step


def test_a_buffer_replaced_by_a_new_tensor_retraces():
    eager, _ = _prior_swap_losses(jit=False)
    traced, step = _prior_swap_losses(jit="auto")
    assert traced == pytest.approx(eager, rel=1e-6)
    assert len(step._graphs) == 2
    assert abs(eager[1] - eager[0]) > 1.0  # the swap mattered: the test can fail


def test_a_global_module_hook_makes_the_step_eager():
    pyro.set_rng_seed(0)
    model, guide = build_model_and_guide(FitConfig(latent_dim=2, hidden=(8,)), 16)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert "global module hook" in untraceable_reason(
            make_elbo("trace")(model, guide)
        )
    finally:
        handle.remove()
    assert untraceable_reason(make_elbo("trace")(model, guide)) is None
