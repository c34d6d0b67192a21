r"""Amortized full-covariance Gaussian guide.

.. math::
    q_\phi(z \mid x) = N\big(\mu_\phi(x),\; L_\phi(x) L_\phi(x)^\top\big),
    \qquad L_\phi(x) \text{ lower triangular with a positive diagonal}

It can represent any Gaussian posterior exactly, e.g. that of the linear-Gaussian
oracle. Closed-form KL: torch registers KL(q || MultivariateNormal), but not against
an ``Independent(Normal)`` prior, so an analytic-KL ELBO cannot use this guide with
the standard-Normal prior.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.guides.base import AmortizedGuide
from pyro_vae.guides.gaussian import check_guide_args
from pyro_vae.nn import softplus_floor

__all__ = ["FullRankNormalGuide"]


class FullRankNormalGuide(AmortizedGuide):
    r"""q(z|x) = N(mu(x), L(x) L(x)^T), L the Cholesky factor of the covariance.

    The encoder maps x ``(N, D)`` to ``(N, d + d (d + 1) / 2)``: mu, then the d
    softplus-inputs of the diagonal of L, then its d (d - 1) / 2 strictly-lower
    entries in ``torch.tril_indices`` order (row by row). The diagonal is
    ``softplus(.) + floor``, so L is a valid Cholesky factor (the covariance is
    positive definite) whatever the encoder outputs. Sampling is reparameterized,
    z = mu + L eps.

    Args:
        encoder: a network from ``(N, D)`` to ``(N, out_features(latent_dim))``.
        latent_dim: d.
        scale_floor: the smallest diagonal entry of L.

    References:
        Kingma & Welling (2014), Auto-Encoding Variational Bayes, arXiv:1312.6114
        (the reparameterization). Kingma, Salimans et al. (2016), Improved
        Variational Inference with Inverse Autoregressive Flow, arXiv:1606.04934,
        sec. 3 (the full-covariance Gaussian as a linear autoregressive map).
    """

    def __init__(
        self, encoder: nn.Module, latent_dim: int, scale_floor: float = 1e-4
    ) -> None:
        super().__init__()
        check_guide_args(latent_dim, scale_floor)
        self.encoder = encoder
        self.latent_dim, self.scale_floor = latent_dim, scale_floor
        self.register_buffer(
            "off_diagonal", torch.tril_indices(latent_dim, latent_dim, -1)
        )

    @staticmethod
    def out_features(latent_dim: int) -> int:
        """The encoder's output width: d + d (d + 1) / 2."""
        return latent_dim + latent_dim * (latent_dim + 1) // 2

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mu ``(N, d)``, L ``(N, d, d)``)."""
        d = self.latent_dim
        loc, raw_diag, lower = self.encoder(x).split([d, d, d * (d - 1) // 2], dim=-1)
        scale_tril = torch.diag_embed(softplus_floor(raw_diag, self.scale_floor))
        rows, cols = self.off_diagonal
        scale_tril[..., rows, cols] = lower  # a fresh tensor: autograd allows it
        return loc, scale_tril

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """q(z|x): batch shape ``(N,)``, event shape ``(d,)``."""
        loc, scale_tril = self.encode(x)
        return dist.MultivariateNormal(loc, scale_tril=scale_tril)
