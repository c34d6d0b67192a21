"""Checks before training: the data lie in the likelihood's support, and
``--elbo meanfield`` has its closed-form KL. Each failure names the fix.
"""

from __future__ import annotations

import torch
from pyro import poutine
from torch.distributions import kl_divergence

from pyro_vae.cli.config import FitConfig
from pyro_vae.data import Splits
from pyro_vae.errors import ConfigError, DataError

__all__ = ["check_closed_form_kl", "check_support"]


def check_closed_form_kl(
    model: torch.nn.Module, guide: torch.nn.Module, x: torch.Tensor, cfg: FitConfig
) -> None:
    """``--elbo meanfield`` needs KL(q(z|x) || p(z)) in closed form: refuse otherwise.

    Pyro's TraceMeanField_ELBO silently falls back to a Monte Carlo KL; pyro_vae
    refuses instead, so that "meanfield" always means the analytic KL.
    """
    with torch.no_grad(), torch.random.fork_rng():
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, guide_trace)).get_trace(x)
    q, p = guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"]
    try:
        kl_divergence(q, p)
    except NotImplementedError:
        raise ConfigError(
            f"--elbo meanfield needs KL(q(z|x) || p(z)) in closed form, and there is "
            f"none for the {cfg.guide} guide ({type(q).__name__}) against the "
            f"{cfg.prior} prior ({type(p).__name__}); use --elbo trace (a Monte Carlo "
            "KL) for this pair"
        ) from None


def check_support(likelihood: object, splits: Splits, binarize: str) -> None:
    """Every split the likelihood will score must lie in its support."""
    scored = [splits.valid, splits.test]
    if binarize != "dynamic":  # dynamic batches are Bernoulli draws: binary by design
        scored.append(splits.train)
    try:
        for x in scored:
            likelihood.check_data(x)
    except ValueError as err:
        raise DataError(str(err)) from None
