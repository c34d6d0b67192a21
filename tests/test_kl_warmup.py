"""KL warm-up (Sønderby et al., 2016): a tensor weight the fast step reads each step.

The objective at weight w is -E_q log p(x|z) + w KL(q(z|x) || p(z)) estimated by
Monte Carlo; the weight rises linearly over ``--kl-warmup`` epochs; the traced step
sees every change of it; reported ELBOs keep weight 1; resume is exact.
"""

from __future__ import annotations

import csv
import json

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.cli.fit import main
from pyro_vae.data import Splits
from pyro_vae.errors import ConfigError
from pyro_vae.losses import Trace_InfoVAE, infovae_preset
from pyro_vae.training.loop import (
    Schedule,
    TrainOptions,
    kl_weight_at,
    make_elbo,
    train,
)
from pyro_vae.training.step import StepLoss

TINY = ["--hidden", "32", "--latent-dim", "3", "--quiet", "--eval-k", "0"]


def _parts(seed=0):
    pyro.set_rng_seed(seed)
    model, guide = build_model_and_guide(FitConfig(latent_dim=3, hidden=(16,)), 64)
    return model.double(), guide.double()


def _data(n=60):
    gen = torch.Generator().manual_seed(1)
    return torch.bernoulli(torch.rand(n, 64, generator=gen)).double()


def test_the_weight_rises_linearly_over_the_warmup_epochs():
    assert kl_weight_at(1, 0.0, 4) == 0.0
    assert kl_weight_at(1, 0.5, 4) == pytest.approx(0.125)
    assert kl_weight_at(3, 0.0, 4) == pytest.approx(0.5)
    assert kl_weight_at(5, 0.0, 4) == 1.0
    assert kl_weight_at(9, 0.7, 4) == 1.0


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_the_weighted_objective_against_its_terms_on_the_same_draws(weight):
    """loss = -(log p(x|z) + w (log p(z) - log q(z|x))), value and gradient."""
    model, guide = _parts()
    x = _data(8)
    loss_obj = Trace_InfoVAE(0.0, 1.0, kl_warmup=True, max_plate_nesting=1)
    module = loss_obj(model, guide)
    loss_obj.kl_weight.fill_(weight)
    pyro.set_rng_seed(7)
    loss = module(x)
    grads = torch.autograd.grad(loss, list(guide.parameters()))
    pyro.set_rng_seed(7)
    guide_tr = poutine.trace(guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(model, guide_tr)).get_trace(x)
    log_px = model_tr.nodes["x"]["fn"].log_prob(x).sum()
    log_pz = model_tr.nodes["z"]["fn"].log_prob(model_tr.nodes["z"]["value"]).sum()
    log_qz = guide_tr.nodes["z"]["fn"].log_prob(guide_tr.nodes["z"]["value"]).sum()
    expected = -(log_px + weight * (log_pz - log_qz))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for a, b in zip(
        grads, torch.autograd.grad(expected, list(guide.parameters())), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _train(jit, warmup=2.0, epochs=3):
    model, guide = _parts()
    x = _data()
    objective = infovae_preset("elbo", kl_warmup=True, max_plate_nesting=1)
    pyro.set_rng_seed(3)
    history, _ = train(
        model,
        guide,
        Splits.of(x, x[:20]),
        Schedule(epochs=epochs, batch_size=20, lr=1e-2, kl_warmup=warmup),
        elbo=make_elbo("trace"),
        objective=objective,
        options=TrainOptions(jit=jit),
    )
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return history, params, objective


def test_the_traced_step_reads_the_weight_every_step():
    eager_history, eager, _ = _train(jit=False)
    traced_history, traced, objective = _train(jit="auto")
    assert torch.equal(traced, eager)
    assert objective.kl_weight.item() == 1.0  # epoch 3 of a 2-epoch warm-up
    # The warm-up changed the training: without it the parameters differ.
    model, guide = _parts()
    x = _data()
    pyro.set_rng_seed(3)
    train(
        model,
        guide,
        Splits.of(x, x[:20]),
        Schedule(epochs=3, batch_size=20, lr=1e-2),
        elbo=make_elbo("trace"),
    )
    plain = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (plain - eager).abs().max() > 1e-3


def test_reported_elbos_keep_weight_one():
    history, _, _ = _train(jit="auto", warmup=1000.0, epochs=3)
    last = history[-1]  # KL weight below 0.003 throughout
    # the objective minimized leaves out the KL (about 3 nats); the ELBO has it all
    assert last.train_loss < -last.train_elbo - 1.0


def test_kl_warmup_needs_a_kl_term_and_the_monte_carlo_kl():
    with pytest.raises(ConfigError, match="--loss mmd-vae has none"):
        FitConfig(kl_warmup=2, loss="mmd-vae")
    with pytest.raises(ConfigError, match="--elbo trace"):
        FitConfig(kl_warmup=2, elbo="meanfield")
    with pytest.raises(ConfigError, match=">= 0"):
        FitConfig(kl_warmup=-1)
    model, guide = _parts()
    with pytest.raises(ValueError, match="kl_weight"):
        train(
            model,
            guide,
            Splits.of(_data(), _data(20)),
            Schedule(epochs=1, batch_size=20, lr=1e-2, kl_warmup=2),
            elbo=make_elbo("trace"),
        )


def _rows(out):
    with open(out / "history.csv", newline="") as f:
        return [
            {k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)
        ]


def test_cli_warmup_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = [*TINY, "--kl-warmup", "2"]
    assert main([*flags, "--epochs", "3", "--out", str(straight)]) == 0
    assert main([*flags, "--epochs", "1", "--out", str(resumed)]) == 0
    assert main(["--resume", str(resumed), "--epochs", "3", "--quiet"]) == 0
    assert _rows(resumed) == _rows(straight)
    rows = _rows(straight)
    # epoch 1 weighs the KL by 0.25 on average: the objective lies below -ELBO
    assert float(rows[0]["train_loss"]) < -float(rows[0]["train_elbo"]) - 0.1
    assert json.loads((straight / "config.json").read_text())["kl_warmup"] == 2.0


def test_a_moved_loss_module_keeps_reading_the_weight_it_is_given():
    """.double() after building: the warm-up's fill reaches the traced graph."""
    pyro.set_rng_seed(0)
    model, guide = build_model_and_guide(FitConfig(latent_dim=3, hidden=(16,)), 64)
    objective = Trace_InfoVAE(0.0, 1.0, kl_warmup=True, max_plate_nesting=1)
    module = objective(model.float(), guide.float()).double()
    assert objective.kl_weight is module.kl_weight
    assert objective.kl_weight.dtype == torch.float64
    step = StepLoss(module)
    x = _data(8)
    for i in range(12):
        objective.kl_weight.fill_(i / 12)
        step(x)
    assert step.jit and len(step._graphs) == 1
