r"""A hand-written, batched, pure-torch importance sampler for the built-in MLP VAE.

It computes the same log-weights as :func:`pyro_vae.evaluate.log_weights` for one
specific VAE, with no Pyro at all:

.. math::
    \log w = \log N(z; 0, I) + \log p(x \mid f(z)) - \log N(z; \mu(x), \sigma(x)^2),
    \quad z = \mu(x) + \sigma(x) \odot \epsilon,

where the encoder gives (μ, softplus⁻¹-parameterized σ) and the likelihood is
Bernoulli on logits or Gaussian with a fixed σ. It exists as a yardstick: tests check
that the trace-based estimator agrees with it, and ``benchmarks/bench_evaluate.py``
times the two against each other.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["mlp_vae_log_weights"]

_LOG_2PI = math.log(2 * math.pi)


def _normal_log_prob(
    x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    return (-0.5 * ((x - loc) / scale).square() - scale.log() - 0.5 * _LOG_2PI).sum(-1)


@torch.no_grad()
def mlp_vae_log_weights(
    encoder: nn.Module,
    decoder: nn.Module,
    x: torch.Tensor,
    k: int,
    *,
    scale_floor: float,
    sigma: float | None = None,
) -> torch.Tensor:
    """Log-weights ``(k, N)`` of the MLP VAE with a N(0, I) prior.

    Args:
        encoder: x ``(N, D)`` -> ``(N, 2d)``: mean, then the softplus-input of σ.
        decoder: z ``(k, N, d)`` -> logits (Bernoulli) or means (Gaussian).
        x: data ``(N, D)``.
        k: samples per datum.
        scale_floor: the guide's σ floor: σ = softplus(·) + floor.
        sigma: None for a Bernoulli likelihood, else the Gaussian's fixed σ.
    """
    loc, raw = encoder(x).chunk(2, dim=-1)
    scale = F.softplus(raw) + scale_floor
    z = loc + scale * torch.randn((k, *loc.shape), dtype=loc.dtype, device=loc.device)
    out = decoder(z)
    if sigma is None:
        log_lik = -F.binary_cross_entropy_with_logits(
            out, x.expand_as(out), reduction="none"
        ).sum(-1)
    else:
        log_lik = _normal_log_prob(x, out, torch.tensor(sigma).to(out))
    log_prior = (-0.5 * z.square() - 0.5 * _LOG_2PI).sum(-1)
    return log_prior + log_lik - _normal_log_prob(z, loc, scale)
