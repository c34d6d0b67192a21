"""Amortized diagonal-Normal guide q_phi(z | x) = N(mu_phi(x), diag sigma_phi(x)^2)."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.guides.base import AmortizedGuide
from pyro_vae.nn import softplus_floor

__all__ = ["DiagonalNormalGuide", "check_guide_args"]


def check_guide_args(latent_dim: int, scale_floor: float) -> None:
    """Refuse a latent size below 1 or a non-positive scale floor, naming the value."""
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")
    if not scale_floor > 0:
        raise ValueError(f"scale_floor must be positive, got {scale_floor}")


class DiagonalNormalGuide(AmortizedGuide):
    r"""q(z|x) = N(mu(x), diag(sigma(x)^2)), sampled by reparameterization.

    The encoder maps x ``(N, D)`` to ``(N, 2d)``: the first half is mu, the second is
    passed through ``softplus(.) + floor`` to give sigma, so that sigma > floor and
    the log-density stays finite. Pyro draws z = mu + sigma * eps with eps ~ N(0, I)
    (the reparameterization trick, AEVB section 2.4), so gradients of the ELBO reach
    the encoder through z.

    Args:
        encoder: a network from ``(N, D)`` to ``(N, 2 * latent_dim)``.
        latent_dim: d.
        scale_floor: the smallest standard deviation allowed.

    References:
        Kingma & Welling (2014), Auto-Encoding Variational Bayes, arXiv:1312.6114.
    """

    def __init__(
        self, encoder: nn.Module, latent_dim: int, scale_floor: float = 1e-4
    ) -> None:
        super().__init__()
        check_guide_args(latent_dim, scale_floor)
        self.encoder = encoder
        self.latent_dim = latent_dim
        self.scale_floor = scale_floor

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mu, sigma), each of shape ``(N, d)``."""
        loc, raw_scale = self.encoder(x).split(self.latent_dim, dim=-1)
        return loc, softplus_floor(raw_scale, self.scale_floor)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z|x): batch shape ``(N,)``, event shape ``(d,)``."""
        loc, scale = self.encode(x)
        return dist.Normal(loc, scale).to_event(1)
