"""The fast training step computes what Pyro's plain Trace_ELBO path computes.

Same seed, same batches: the traced loss gives Pyro's eager gradients bit for bit and
its loss to float rounding, for every kind of part (in float64; in float32 the
VampPrior's float64 matrix products may round differently); the whole fast path
(validation once, traced loss, fused Adam) ends a few steps at the parameters of a
plain ``Trace_ELBO`` + ``torch.optim.Adam`` loop.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.infer.trace_elbo
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.util import torch_item
from pyro.nn import PyroModule

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.data import Splits, batches
from pyro_vae.losses import make_objective
from pyro_vae.training.loop import Schedule, make_elbo, train
from pyro_vae.training.step import StepLoss, make_optimizer

PARTS = {
    "default": {},
    "mog prior": {"prior": "mog", "components": 3},
    "vamp prior": {"prior": "vamp", "pseudo_inputs": 4},
    "student-t prior": {"prior": "student-t"},
    "flow guide": {"guide": "flow", "flow_steps": 2},
    "lowrank guide": {"guide": "lowrank", "rank": 2},
    "gaussian learned sigma": {"likelihood": "gaussian-learned"},
    "discretized logistic": {"likelihood": "discretized-logistic"},
    "conv": {"arch": "conv"},
}


def _parts(options, seed=0):
    pyro.set_rng_seed(seed)
    cfg = FitConfig(latent_dim=3, hidden=(16,), **options)
    model, guide = build_model_and_guide(cfg, 64, (1, 8, 8))
    return model, guide


def _data(n=40):
    return torch.bernoulli(
        torch.rand(n, 64, generator=torch.Generator().manual_seed(1))
    )


def _run(loss_fn, call, x, steps, optimizer):
    """Take ``steps`` steps on fixed batches; return the losses and parameters.

    Seeded once: a path that spent one draw more or less than eager Pyro on any
    step would differ from then on.
    """
    losses = []
    pyro.set_rng_seed(100)
    for i in range(steps):
        batch = x[8 * i : 8 * (i + 1)] if i % 2 else x[: 8 * (i + 1)]  # two shapes
        loss = call(batch)
        optimizer.zero_grad()
        (loss / len(batch)).backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in loss_fn.parameters()]


@pytest.mark.parametrize("name", list(PARTS))
def test_traced_loss_gives_the_eager_gradients_bit_for_bit(name):
    x = _data()
    runs = []
    for traced in (False, True):
        model, guide = _parts(PARTS[name])
        loss_fn = make_elbo("trace")(model, guide)
        call = StepLoss(loss_fn) if traced else loss_fn
        opt = make_optimizer(loss_fn.parameters(), 1e-2)
        runs.append(_run(loss_fn, call, x, 5, opt))
    (eager_losses, eager_params), (jit_losses, jit_params) = runs
    assert jit_losses == pytest.approx(eager_losses, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(eager_params, jit_params, strict=True))


@pytest.mark.parametrize("name", ["default", "flow guide", "vamp prior"])
def test_float32_traced_loss_matches_eager(name):
    """In float32 too; the VampPrior's float64 matrix products (models/priors.py) may
    round differently in the graph's backward pass, so there the bound is 1e-5."""
    torch.set_default_dtype(torch.float32)
    x = _data().float()
    runs = []
    for traced in (False, True):
        model, guide = _parts(PARTS[name])
        loss_fn = make_elbo("trace")(model, guide)
        call = StepLoss(loss_fn) if traced else loss_fn
        runs.append(
            _run(loss_fn, call, x, 5, make_optimizer(loss_fn.parameters(), 1e-2))
        )
    (eager_losses, eager_params), (jit_losses, jit_params) = runs
    assert jit_losses == pytest.approx(eager_losses, rel=1e-5)
    for a, b in zip(eager_params, jit_params, strict=True):
        assert a.dtype == torch.float32
        if name == "vamp prior":
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("name", "particles"), [("trace", 4), ("meanfield", 1), ("meanfield", 3)]
)
def test_traced_estimators_match_eager(name, particles):
    """Vectorized particles and the analytic KL, through StepLoss(jit=False) too."""
    x = _data()
    runs = []
    for jit in (False, True):
        model, guide = _parts({})
        loss_fn = make_elbo(name, particles)(model, guide)
        opt = make_optimizer(loss_fn.parameters(), 1e-2)
        runs.append(_run(loss_fn, StepLoss(loss_fn, jit=jit), x, 5, opt))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_traced_infovae_objective_matches_eager():
    x = _data()
    runs = []
    for traced in (False, True):
        model, guide = _parts({})
        objective = make_objective(
            "infovae", alpha=0.5, lam=10.0, beta=1.0, kernel="rbf", bandwidth="dim"
        )
        loss_fn = objective(model, guide)
        call = StepLoss(loss_fn) if traced else loss_fn
        opt = make_optimizer(loss_fn.parameters(), 1e-2)
        runs.append(_run(loss_fn, call, x, 4, opt))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_fast_training_ends_where_the_plain_trace_elbo_loop_ends():
    """train() (validation once, traced loss, fused Adam) against the tutorial loop."""
    x = _data(64)
    model, guide = _parts({})
    pyro.set_rng_seed(7)
    history, _ = train(
        model,
        guide,
        Splits.of(x, x[:16]),
        Schedule(epochs=2, batch_size=16, lr=1e-2),
        elbo=make_elbo("trace"),
    )
    fast = [
        p.detach().clone() for p in torch.nn.ModuleList([model, guide]).parameters()
    ]

    model, guide = _parts({})
    loss_fn = Trace_ELBO()(model, guide)
    opt = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)  # the default, not fused
    pyro.set_rng_seed(7)
    total = 0.0
    for epoch in range(2):
        total = 0.0
        for batch in batches(x, 16, shuffle=True):
            loss = loss_fn(batch)
            opt.zero_grad()
            (loss / len(batch)).backward()
            opt.step()
            total += loss.item()
        if epoch == 0:
            loss_fn(x[:16])  # train() spends draws on the validation ELBO
    plain = [p.detach().clone() for p in loss_fn.parameters()]
    # fused and for-each Adam agree to rounding; the traced gradients are exact
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert history[-1].train_elbo == pytest.approx(-total / len(x), rel=1e-6)


def test_tracing_restores_pyros_torch_item():
    model, guide = _parts({})
    step = StepLoss(Trace_ELBO()(model, guide))
    step(_data()[:8])  # validates, traces and runs
    assert pyro.infer.trace_elbo.torch_item is torch_item
    assert step._graphs  # it did trace


class _Branchy(PyroModule):
    """Branches on a data value: the trace would freeze the branch taken."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x):
        shift = 1.0 if x.sum() > 0 else -1.0
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(self.w + shift, 1.0).to_event(1), obs=x)


def test_a_model_branching_on_data_values_is_named_when_traced():
    step = StepLoss(Trace_ELBO()(_Branchy(), lambda x: None), jit=True)
    with pytest.warns(RuntimeWarning, match=r"froze a Python value.*--no-jit"):
        step(torch.randn(8, 3))


class _Untraceable(PyroModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x):
        if torch._C._get_tracing_state():
            raise RuntimeError("no tracing here")
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(self.w, 1.0).to_event(1), obs=x)


def test_a_model_that_cannot_be_traced_trains_eagerly_with_a_warning():
    model, x = _Untraceable(), torch.randn(8, 3)
    step = StepLoss(Trace_ELBO()(model, lambda x: None), jit=True)
    with pytest.warns(RuntimeWarning, match="torch.jit.trace could not record"):
        first = step(x)
    second = step(x)
    assert not step.jit and torch.isfinite(first) and torch.isfinite(second)
    expected = -dist.Normal(0.0, 1.0).log_prob(x).sum()
    assert second.item() == pytest.approx(expected.item(), rel=1e-12)


def test_make_optimizer_sets_adams_eps():
    """Burda et al. (2016) train with Adam's ε = 1e-4 (benchmarks/bench_mnist.py)."""
    param = torch.nn.Parameter(torch.zeros(3))
    assert make_optimizer([param], 1e-3).param_groups[0]["eps"] == 1e-8
    assert make_optimizer([param], 1e-3, eps=1e-4).param_groups[0]["eps"] == 1e-4
