"""Reconstructions and prior samples for any (model, guide) pair, through traces.

None of them knows the model's class: they read the distribution at the model's
site ``"x"``, so they work for any prior, likelihood and guide that keep the
site contract of :mod:`pyro_vae.models.vae`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pyro
import torch
from pyro import poutine

__all__ = ["decode", "encode_mean", "interpolate", "reconstruct", "sample_prior"]


@torch.no_grad()
def reconstruct(model: Callable, guide: Callable, x: torch.Tensor) -> torch.Tensor:
    """E[x' | z] with z ~ q(z | x): the mean of p(x | z) at a guide draw, ``(N, D)``."""
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    return model_trace.nodes["x"]["fn"].mean


@torch.no_grad()
def sample_prior(model: Callable, n: int | torch.Tensor) -> torch.Tensor:
    """E[x | z] with z ~ p(z), for n draws of z: ``(n, D)``.

    ``n`` may also be a tensor ``(n, D)``, used only for its number of rows (the
    older form). A model that samples without data (``model(n=n)``, see
    :mod:`pyro_vae.models.vae`) is run that way; one that only takes ``model(x)``
    needs that tensor, and is run on it with the mean read at its site ``"x"``.
    """
    if _samples_without_data(model):
        count = len(n) if isinstance(n, torch.Tensor) else int(n)
        model_trace = poutine.trace(model).get_trace(n=count)
    elif isinstance(n, torch.Tensor):
        model_trace = poutine.trace(model).get_trace(n)
    else:
        raise TypeError(
            f"{type(model).__name__} cannot sample without data (it takes no "
            "argument n); pass a tensor (n, D) whose rows stand in for the data"
        )
    return model_trace.nodes["x"]["fn"].mean


def _samples_without_data(model: Callable) -> bool:
    """Whether ``model`` takes ``x=None`` with a keyword ``n`` (the model contract)."""
    try:
        fn = model.forward if isinstance(model, torch.nn.Module) else model
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    x = next(iter(params.values()), None)
    return (
        "n" in params
        and x is not None
        and x.default is None
        and params["n"].kind is not inspect.Parameter.POSITIONAL_ONLY
    )


@torch.no_grad()
def decode(model: Callable, z: torch.Tensor, data_dim: int) -> torch.Tensor:
    """E[x | z] for given codes z ``(N, d)``: the model run with its site z fixed."""
    x_like = z.new_zeros(len(z), data_dim)
    conditioned = poutine.condition(model, data={"z": z})
    return poutine.trace(conditioned).get_trace(x_like).nodes["x"]["fn"].mean


@torch.no_grad()
def encode_mean(guide: Callable, x: torch.Tensor, draws: int = 64) -> torch.Tensor:
    """E_q[z | x] per datum: the guide's own mean if it has one, else MC draws."""
    try:
        return guide.posterior(x).mean
    except (AttributeError, NotImplementedError):
        with pyro.plate("particles", draws, dim=-2):
            trace = poutine.trace(guide).get_trace(x)
        return trace.nodes["z"]["value"].mean(dim=0)


@torch.no_grad()
def interpolate(
    model: Callable, guide: Callable, x_a: torch.Tensor, x_b: torch.Tensor, steps: int
) -> torch.Tensor:
    """Decode straight lines in z from E_q[z|x_a] to E_q[z|x_b]: ``(N, steps, D)``."""
    z_a, z_b = encode_mean(guide, x_a), encode_mean(guide, x_b)
    t = torch.linspace(0, 1, steps).to(z_a)[None, :, None]
    path = (1 - t) * z_a[:, None] + t * z_b[:, None]  # (N, steps, d)
    flat = decode(model, path.reshape(-1, path.shape[-1]), x_a.shape[-1])
    return flat.reshape(len(x_a), steps, -1)
