"""Trace_IWAE (reparameterized and DReG gradients) and TraceSTL_ELBO, checked exactly.

Identities under a shared seed (IWAE_1 is Trace_ELBO; DReG's model gradient is
IWAE's; DReG_1 is STL), the pPCA oracle (IWAE_K against log_marginal; STL and DReG
vanish at the exact posterior), means over seeds within 5 standard errors (DReG and
STL have the reparameterized gradient's expectation), what Pyro's RenyiELBO sums,
the traced step against eager Pyro, and the command line.
"""

from __future__ import annotations

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from pyro.nn import PyroModule
from pyro.optim import SGD
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.cli.fit import main
from pyro_vae.errors import ConfigError
from pyro_vae.evaluate import log_marginal
from pyro_vae.losses import SiteContractError, Trace_IWAE, TraceSTL_ELBO
from pyro_vae.losses.particles import particle_traces, path_log_q
from pyro_vae.models import LinearGaussian
from pyro_vae.training.step import StepLoss, make_optimizer

D, d, N = 5, 2, 4
SIGMA = 0.5


@pytest.fixture
def oracle_and_data():
    """A pPCA model with random W, b (seeded) and N data drawn from it."""
    gen = torch.Generator().manual_seed(1234)
    weight = torch.randn(D, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(D, generator=gen, dtype=torch.float64)
    z = torch.randn(N, d, generator=gen, dtype=torch.float64)
    x = z @ weight.T + bias + SIGMA * torch.randn(N, D, generator=gen)
    return LinearGaussian(weight, bias, SIGMA), x


class ShiftedPosterior(PyroModule):
    """q(z|x) = N(m(x) + shift, diag(s) L Lᵀ diag(s)), s = exp(log_scale), around
    the oracle's exact posterior N(m(x), L Lᵀ): exact at shift 0, scale 1.

    The posterior's maps are buffers (a frozen copy of the oracle), so the guide's
    only parameters are ``shift`` and ``log_scale``.
    """

    def __init__(self, oracle: LinearGaussian, shift=0.0, scale=1.0):
        super().__init__()
        w, s2 = oracle.weight.detach(), oracle.sigma**2
        cov = torch.linalg.inv(torch.eye(d) + w.T @ w / s2)
        self.register_buffer("gain", w @ cov.T / s2)  # m(x) = (x - b) @ gain
        self.register_buffer("offset", oracle.bias.detach().clone())
        self.register_buffer("tril", torch.linalg.cholesky(cov))
        self.shift = nn.Parameter(torch.full((d,), float(shift)))
        self.log_scale = nn.Parameter(torch.full((d,), math.log(scale)))

    def forward(self, x):
        loc = (x - self.offset) @ self.gain + self.shift
        tril = self.log_scale.exp()[:, None] * self.tril
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=tril))


def _grads(loss, model, guide, x, seed, params):
    """The loss's value and its gradient for ``params`` (flattened), at ``seed``."""
    pyro.set_rng_seed(seed)
    value = loss.differentiable_loss(model, guide, x)
    grads = torch.autograd.grad(value, params, allow_unused=True)
    flat = [
        torch.zeros_like(p) if g is None else g
        for p, g in zip(params, grads, strict=True)
    ]
    return value.detach(), torch.cat([g.reshape(-1) for g in flat])


def _guide_grads(loss, model, guide, x, seeds):
    """Guide gradients over seeds: ``(len(seeds), 2d)``."""
    params = [guide.shift, guide.log_scale]
    return torch.stack([_grads(loss, model, guide, x, s, params)[1] for s in seeds])


def _mean_se(values):
    return values.mean(0), values.std(0) / math.sqrt(len(values))


# ---------------------------------------------------------------- exact identities


@pytest.mark.parametrize("options", [{}, {"guide": "flow", "flow_steps": 1}])
def test_one_particle_iwae_is_trace_elbo_in_value_and_gradient(options):
    pyro.set_rng_seed(0)
    model, guide = build_model_and_guide(
        FitConfig(latent_dim=3, hidden=(16,), **options), 64
    )
    x = torch.bernoulli(torch.rand(6, 64, generator=torch.Generator().manual_seed(1)))
    params = [*model.parameters(), *guide.parameters()]
    n_model = sum(p.numel() for p in model.parameters())
    v_elbo, g_elbo = _grads(Trace_ELBO(max_plate_nesting=1), model, guide, x, 5, params)
    v_iwae, g_iwae = _grads(Trace_IWAE(1), model, guide, x, 5, params)
    v_dreg, g_dreg = _grads(Trace_IWAE(1, "dreg"), model, guide, x, 5, params)
    v_stl, g_stl = _grads(TraceSTL_ELBO(1), model, guide, x, 5, params)
    for value in (v_iwae, v_dreg, v_stl):
        assert value.item() == pytest.approx(v_elbo.item(), rel=1e-13)
    torch.testing.assert_close(g_iwae, g_elbo, rtol=1e-10, atol=1e-12)
    # with one particle w̃ = 1: DReG is STL, and both keep the model's gradient
    torch.testing.assert_close(g_dreg, g_stl, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_stl[:n_model], g_elbo[:n_model], rtol=1e-10, atol=0)
    # ... but not the guide's: STL drops the score term
    assert (g_stl[n_model:] - g_elbo[n_model:]).abs().max() > 1e-3


def test_dreg_gives_the_model_the_iwae_gradient(oracle_and_data):
    oracle, x = oracle_and_data
    guide = ShiftedPosterior(oracle, shift=0.5, scale=1.5)
    params = list(oracle.parameters())
    for seed in range(3):
        v_re, g_re = _grads(Trace_IWAE(7), oracle, guide, x, seed, params)
        v_dr, g_dr = _grads(Trace_IWAE(7, "dreg"), oracle, guide, x, seed, params)
        assert v_dr.item() == pytest.approx(v_re.item(), rel=1e-13)
        torch.testing.assert_close(g_dr, g_re, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the pPCA oracle


def test_iwae_loss_matches_log_marginal_iwae_k_on_the_oracle(oracle_and_data):
    """-loss of Trace_IWAE(10) averaged over 400 draws against log_marginal's
    iwae[10] (2000 disjoint groups of 10 per datum): within 5 se; and strictly
    between the exact ELBO and the exact log p(x), so the check can fail."""
    oracle, x = oracle_and_data
    guide = ShiftedPosterior(oracle, shift=0.5, scale=1.5)
    loss = Trace_IWAE(10)
    bounds = torch.tensor([-loss.loss(oracle, guide, x) for _ in range(400)])
    mean, se = _mean_se(bounds)
    ref = log_marginal(oracle, guide, x, k=20000, seed=1, psis=False)
    ref_mean, ref_se = ref.iwae[10].sum(), ref.iwae_se[10].square().sum().sqrt()
    assert abs(mean - ref_mean) < 5 * math.hypot(se, ref_se)
    with torch.no_grad():
        log_px = oracle.log_px(x).sum()
        q = guide_q(guide, x)
        elbo = log_px - torch.distributions.kl_divergence(q, oracle.posterior(x)).sum()
    assert elbo + 5 * se < mean < log_px - 5 * se


def guide_q(guide: ShiftedPosterior, x):
    loc = (x - guide.offset) @ guide.gain + guide.shift
    tril = guide.log_scale.exp()[:, None] * guide.tril
    return dist.MultivariateNormal(loc, scale_tril=tril)


def test_stl_and_dreg_guide_gradients_vanish_at_the_exact_posterior(oracle_and_data):
    """log p(x, z) - log q(z|x) = log p(x) for every z: the path derivative is 0
    for every draw, while the reparameterized gradient's score term is not."""
    oracle, x = oracle_and_data
    guide = ShiftedPosterior(oracle)
    seeds = range(20)
    stl = _guide_grads(TraceSTL_ELBO(3), oracle, guide, x, seeds)
    dreg = _guide_grads(Trace_IWAE(5, "dreg"), oracle, guide, x, seeds)
    reparam = _guide_grads(Trace_ELBO(max_plate_nesting=1), oracle, guide, x, seeds)
    assert stl.abs().max() < 1e-10 and dreg.abs().max() < 1e-10
    assert reparam.var(0).min() > 1e-2


def test_stl_guide_gradient_has_the_reparameterized_expectation(oracle_and_data):
    oracle, x = oracle_and_data
    guide = ShiftedPosterior(oracle, shift=0.5, scale=1.5)
    seeds = range(200)
    stl = _guide_grads(TraceSTL_ELBO(), oracle, guide, x, seeds)
    reparam = _guide_grads(Trace_ELBO(max_plate_nesting=1), oracle, guide, x, seeds)
    mean, se = _mean_se(stl - reparam)  # paired: the same draws
    assert (mean.abs() < 5 * se).all(), (mean, se)
    # the check can fail: the gradient itself is many se from 0
    assert (reparam.mean(0).abs() > 10 * se).all()


def test_dreg_guide_gradient_has_the_iwae_expectation(oracle_and_data):
    oracle, x = oracle_and_data
    guide = ShiftedPosterior(oracle, shift=0.5, scale=1.5)
    seeds = range(200)
    dreg = _guide_grads(Trace_IWAE(10, "dreg"), oracle, guide, x, seeds)
    reparam = _guide_grads(Trace_IWAE(10), oracle, guide, x, seeds)
    mean, se = _mean_se(dreg - reparam)  # paired: the same draws
    assert (mean.abs() < 5 * se).all(), (mean, se)
    # the check can fail: the path derivative weighed by w̃ instead of w̃² (the
    # biased "IWAE-STL") fails it by far (measured: up to 59 se)
    biased = torch.stack([_iwae_stl_guide_grad(oracle, guide, x, s) for s in seeds])
    mean, se = _mean_se(biased - reparam)
    assert (mean.abs() > 5 * se).any()


def _iwae_stl_guide_grad(model, guide, x, seed, k=10):
    """The guide gradient of Σ ⊥(w̃) (log p(x, z) - log q_⊥φ(z)): biased for IWAE."""
    pyro.set_rng_seed(seed)
    traces = particle_traces(model, guide, k, (x,), {}, "IWAE-STL")
    w = torch.softmax(traces.log_w.detach(), dim=0)
    path = traces.log_p - path_log_q(guide, traces, "IWAE-STL")
    grads = torch.autograd.grad(-(w * path).sum(), [guide.shift, guide.log_scale])
    return torch.cat(grads)


def test_dreg_lowers_the_guide_gradient_variance_at_k50(oracle_and_data):
    """Tucker et al. (2019): the reparameterized IWAE gradient of the guide gets
    noisier relative to its size as K grows; DReG does not. The ratio of the total
    variances is printed (pytest -s); measured 114 (82 to 143 per coordinate)."""
    oracle, x = oracle_and_data
    guide = ShiftedPosterior(oracle, shift=0.5, scale=1.5)
    seeds = range(200)
    dreg = _guide_grads(Trace_IWAE(50, "dreg"), oracle, guide, x, seeds)
    reparam = _guide_grads(Trace_IWAE(50), oracle, guide, x, seeds)
    ratio = reparam.var(0).sum() / dreg.var(0).sum()
    print(f"var(reparam) / var(DReG) of the guide gradient at K = 50: {ratio:.1f}")
    assert (reparam.var(0) > 10 * dreg.var(0)).all()


@pytest.mark.parametrize(
    "loss",
    [Trace_IWAE(5), Trace_IWAE(5, "dreg"), TraceSTL_ELBO(2)],
    ids=["iwae", "dreg", "stl"],
)
def test_svi_takes_the_estimators_step(oracle_and_data, loss):
    """SVI with Pyro's parameter store (module-local parameters off) and SGD at
    lr = 1 moves each parameter by minus the estimator's gradient, same seed."""
    oracle, x = oracle_and_data
    with pyro.settings.context(module_local_params=False):
        pyro.clear_param_store()
        guide = ShiftedPosterior(oracle, shift=0.5, scale=1.5)
        params = [guide.shift, guide.log_scale, oracle.weight]
        _, grads = _grads(loss, oracle, guide, x, 0, params)
        before = torch.cat([p.detach().reshape(-1) for p in params])
        pyro.set_rng_seed(0)
        SVI(oracle, guide, SGD({"lr": 1.0}), loss).step(x)
        names = ("shift", "log_scale", "weight")
        after = torch.cat([pyro.param(n).detach().reshape(-1) for n in names])
        pyro.clear_param_store()
    torch.testing.assert_close(before - after, grads, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------- what RenyiELBO computes


def _log_weights(model, guide, x, k):
    """log w drawn as RenyiELBO draws (a particle plate at dim -2): per datum
    ``(k, N)`` from the sites in the data plate, per particle ``(k,)`` from any
    site outside it."""
    with pyro.plate("particles", k, dim=-2):
        guide_tr = poutine.trace(guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x)
    local, shared = torch.zeros(k, x.shape[0]), torch.zeros(k)
    for sign, trace in ((1, model_tr), (-1, guide_tr)):
        trace.compute_log_prob()
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            lp = site["unscaled_log_prob"]
            if lp.shape[-1] == x.shape[0]:
                local = local + sign * lp
            else:
                shared = shared + sign * lp.reshape(k)
    return local, shared


def _candidates(log_w, k):
    """(per datum: Σ_n log mean_k w_kn, per batch: log mean_k Π_n w_kn), where a
    site outside the data plate (``shared``) enters the per-batch weights only."""
    local, shared = log_w
    per_datum = (local.logsumexp(0) - math.log(k)).sum()
    per_batch = (local.sum(1) + shared).logsumexp(0) - math.log(k)
    return per_datum.item(), per_batch.item()


def _renyi(model, guide, x, k, seed):
    pyro.set_rng_seed(seed)
    loss = RenyiELBO(
        alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1
    )
    return -loss.loss(model, guide, x)


class _GlobalShift(PyroModule):
    """pPCA plus a global latent s (outside the data plate) added to every x."""

    def __init__(self, oracle):
        super().__init__()
        self.oracle = oracle

    def forward(self, x):
        s = pyro.sample("s", dist.Normal(x.new_zeros(()), 1.0))
        w, b = self.oracle.weight, self.oracle.bias
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(d), 1.0).to_event(1))
            loc = z @ w.T + b + s[..., None]
            pyro.sample("x", dist.Normal(loc, SIGMA).to_event(1), obs=x)


def test_renyi_elbo_is_per_datum_for_a_vae_and_per_batch_with_a_global_latent(
    oracle_and_data,
):
    """Pyro issue #3104: what RenyiELBO(alpha=0) sums before its log-mean-exp."""
    oracle, x = oracle_and_data
    guide, k = ShiftedPosterior(oracle, shift=0.5, scale=1.5), 7
    # a VAE (every site in the data plate): the per-datum IWAE bound
    renyi = _renyi(oracle, guide, x, k, seed=3)
    pyro.set_rng_seed(3)
    per_datum, per_batch = _candidates(_log_weights(oracle, guide, x, k), k)
    assert renyi == pytest.approx(per_datum, rel=1e-12)
    assert abs(per_datum - per_batch) > 0.1
    pyro.set_rng_seed(3)
    assert -Trace_IWAE(k).loss(oracle, guide, x) == pytest.approx(renyi, rel=1e-12)

    # one global latent: the whole batch's bound
    model = _GlobalShift(oracle)

    def global_guide(x):
        pyro.sample("s", dist.Normal(x.new_tensor(0.2), 0.3))
        guide(x)

    renyi = _renyi(model, global_guide, x, k, seed=4)
    pyro.set_rng_seed(4)
    _, per_batch = _candidates(_log_weights(model, global_guide, x, k), k)
    assert renyi == pytest.approx(per_batch, rel=1e-12)
    with pytest.raises(SiteContractError, match="'s' has log_prob shape"):
        Trace_IWAE(k).loss(model, global_guide, x)


def test_renyi_elbo_scales_the_log_weights_inside_the_log_under_subsampling():
    """With a subsampled data plate (scale s = 2), RenyiELBO gives Σ_n log mean_k
    w_kn^s; Trace_IWAE gives the bound, s Σ_n log mean_k w_kn."""
    x, idx, k = torch.randn(4, 3), torch.arange(4), 5

    def model(x):
        with pyro.plate("data", 8, subsample=idx):
            z = pyro.sample("z", dist.Normal(torch.zeros(4, 2), 1.0).to_event(1))
            loc = z.sum(-1, keepdim=True).expand(*z.shape[:-1], 3)
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", 8, subsample=idx):
            pyro.sample("z", dist.Normal(torch.full((4, 2), 0.3), 1.2).to_event(1))

    renyi = _renyi(model, guide, x, k, seed=1)
    pyro.set_rng_seed(1)
    iwae = -Trace_IWAE(k).loss(model, guide, x)
    pyro.set_rng_seed(1)
    log_w = _log_weights(model, guide, x, k)
    assert iwae == pytest.approx(2 * _candidates(log_w, k)[0], rel=1e-12)
    doubled = (2 * log_w[0], log_w[1])
    assert renyi == pytest.approx(_candidates(doubled, k)[0], rel=1e-12)
    assert abs(renyi - iwae) > 0.1


# ------------------------------------------------------------------ refusals


def test_losses_refuse_what_they_cannot_estimate(oracle_and_data):
    oracle, x = oracle_and_data

    def plain_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(d), 1.0).to_event(1))

    with pytest.raises(TypeError, match="needs the guide to be a torch.nn.Module"):
        Trace_IWAE(3, "dreg").differentiable_loss(oracle, plain_guide, x)
    with pytest.raises(TypeError, match="needs the guide to be a torch.nn.Module"):
        TraceSTL_ELBO().differentiable_loss(oracle, plain_guide, x)
    assert math.isfinite(Trace_IWAE(3).loss(oracle, plain_guide, x))

    def discrete_model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(0.5))

    def discrete_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(0.3))

    with pytest.raises(SiteContractError, match="'c' .* has no rsample"):
        Trace_IWAE(3).loss(discrete_model, discrete_guide, x)
    with pytest.raises(ValueError, match="grad_estimator must be one of"):
        Trace_IWAE(3, "stl")
    with pytest.raises(ValueError, match="num_particles >= 1"):
        Trace_IWAE(0)


# --------------------------------------------------------- the fast (traced) step


@pytest.mark.parametrize(
    ("loss", "options"),
    [
        (Trace_IWAE(5), {}),
        (Trace_IWAE(5, "dreg"), {}),
        (Trace_IWAE(3, "dreg"), {"guide": "flow", "flow_steps": 1}),
        (TraceSTL_ELBO(3), {}),
    ],
    ids=["iwae", "dreg", "dreg-flow", "stl"],
)
def test_traced_step_gives_the_eager_gradients(loss, options):
    """As tests/test_step.py for Trace_ELBO: same seed, same batches (two shapes),
    five Adam steps; the traced step ends at the eager parameters bit for bit."""
    x = torch.bernoulli(torch.rand(40, 64, generator=torch.Generator().manual_seed(1)))
    runs = []
    for jit in ("auto", False):
        pyro.set_rng_seed(0)
        model, guide = build_model_and_guide(
            FitConfig(latent_dim=3, hidden=(16,), **options), 64
        )
        loss_fn = loss(model, guide)
        step = StepLoss(loss_fn, jit=jit)
        opt = make_optimizer(loss_fn.parameters(), 1e-2)
        pyro.set_rng_seed(100)
        losses = []
        for i in range(5):
            batch = x[8 * i : 8 * (i + 1)] if i % 2 else x[: 8 * (i + 1)]
            value = step(batch)
            opt.zero_grad()
            (value / len(batch)).backward()
            opt.step()
            losses.append(value.item())
        assert (step.eager_reason is None) == (jit == "auto")
        runs.append((losses, [p.detach().clone() for p in loss_fn.parameters()]))
    (traced_losses, traced), (eager_losses, eager) = runs
    assert traced_losses == pytest.approx(eager_losses, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(traced, eager, strict=True))


# ------------------------------------------------------------------ command line


def test_fit_with_iwae_and_dreg_reports_its_objective(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--loss", "iwae", "--num-particles", "5", "--grad-estimator", "dreg"]
    argv += ["--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--eval-k", "0"]
    assert main([*argv, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["objective"].startswith("IWAE_5 bound per datum")
    assert "DReG gradients" in metrics["objective"]
    assert math.isfinite(metrics["test_elbo"])
    history = (out / "history.csv").read_text().splitlines()
    row = dict(zip(history[0].split(","), history[1].split(","), strict=True))
    # the loss minimized is -IWAE_5, below -ELBO on average; both finite
    assert math.isfinite(float(row["train_loss"]))
    printed = capsys.readouterr().out
    assert "objective: IWAE_5 bound per datum" in printed
    assert "iwae loss" in printed


def test_fit_with_stl_trains(tmp_path):
    out = tmp_path / "run"
    argv = ["--grad-estimator", "stl", "--epochs", "1", "--hidden", "16"]
    assert main([*argv, "--eval-k", "0", "--quiet", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["objective"] == "ELBO, 1 particle(s) per datum, STL gradients"
    assert math.isfinite(metrics["valid_elbo"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"grad_estimator": "dreg"}, "dreg is the doubly reparameterized gradient"),
        ({"grad_estimator": "dreg", "loss": "beta-vae"}, "not of --loss beta-vae"),
        ({"grad_estimator": "stl", "loss": "iwae"}, "stl is a gradient of the ELBO"),
        ({"grad_estimator": "stl", "elbo": "meanfield"}, "use --elbo trace"),
        ({"grad_estimator": "stl", "kl_warmup": 2.0}, "stl and --kl-warmup"),
        ({"loss": "iwae", "kl_warmup": 2.0}, "the IWAE bound .* has none"),
        ({"grad_estimator": "score"}, "--grad-estimator must be one of"),
    ],
)
def test_bad_estimator_combinations_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        FitConfig(**flags)


def test_an_old_config_without_the_estimator_loads():
    values = json.loads(FitConfig().to_json())
    del values["grad_estimator"]
    assert FitConfig.from_dict(values).grad_estimator == "reparam"
