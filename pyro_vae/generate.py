"""Reconstructions and prior samples for any (model, guide) pair, through traces.

Neither function knows the model's class: both read the distribution at the model's
observed site ``"x"``, so they work for any prior, likelihood and guide that keep the
site contract of :mod:`pyro_vae.models.vae`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro import poutine

__all__ = ["reconstruct", "sample_prior"]


@torch.no_grad()
def reconstruct(model: Callable, guide: Callable, x: torch.Tensor) -> torch.Tensor:
    """E[x' | z] with z ~ q(z | x): the mean of p(x | z) at a guide draw, ``(N, D)``."""
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    return model_trace.nodes["x"]["fn"].mean


@torch.no_grad()
def sample_prior(model: Callable, x_like: torch.Tensor) -> torch.Tensor:
    """E[x | z] with z ~ p(z), one per row of ``x_like`` (used only for its shape)."""
    model_trace = poutine.trace(model).get_trace(x_like)
    return model_trace.nodes["x"]["fn"].mean
