r"""Amortized low-rank-plus-diagonal Gaussian guide.

.. math::
    q_\phi(z \mid x) = N\big(\mu_\phi(x),\;
        F_\phi(x) F_\phi(x)^\top + \operatorname{diag} s_\phi(x)^2\big),
    \qquad F_\phi(x) \in \mathbb{R}^{d \times r}

Closed-form KL: torch registers KL(q || MultivariateNormal) (and against another
``LowRankMultivariateNormal``), but not against an ``Independent(Normal)`` prior, so
an analytic-KL ELBO cannot use this guide with the standard-Normal prior.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.guides.base import AmortizedGuide
from pyro_vae.guides.gaussian import check_guide_args
from pyro_vae.nn import softplus_floor

__all__ = ["LowRankNormalGuide"]


class LowRankNormalGuide(AmortizedGuide):
    r"""q(z|x) = N(mu(x), F(x) F(x)^T + diag(s(x)^2)), F of rank ``rank``.

    The encoder maps x ``(N, D)`` to ``(N, d + d * rank + d)``: mu, then F row by row
    (``(d, rank)``), then the softplus-input of s. The diagonal part is parameterized
    as a standard deviation, ``s = softplus(.) + floor``, exactly as in
    :class:`~pyro_vae.guides.DiagonalNormalGuide`, and squared to give the
    ``cov_diag`` of ``LowRankMultivariateNormal``: the covariance is then positive
    definite with every eigenvalue at least ``floor**2``, whatever the encoder
    outputs, and with F = 0 the guide is the diagonal guide. Sampling is
    reparameterized, z = mu + F eps_1 + s * eps_2.

    Args:
        encoder: a network from ``(N, D)`` to ``(N, latent_dim * (rank + 2))``.
        latent_dim: d.
        rank: r, the number of columns of the covariance factor F.
        scale_floor: the smallest standard deviation of the diagonal part.

    References:
        Rezende, Mohamed & Wierstra (2014), Stochastic Backpropagation and
        Approximate Inference in Deep Generative Models, arXiv:1401.4082, sec. 4.3
        (a rank-one-plus-diagonal covariance). Ong, Nott & Smith (2018), Gaussian
        Variational Approximation with a Factor Covariance Structure, JCGS 27(3).
    """

    def __init__(
        self,
        encoder: nn.Module,
        latent_dim: int,
        rank: int = 2,
        scale_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        check_guide_args(latent_dim, scale_floor)
        if rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        self.encoder = encoder
        self.latent_dim, self.rank, self.scale_floor = latent_dim, rank, scale_floor

    @staticmethod
    def out_features(latent_dim: int, rank: int) -> int:
        """The encoder's output width: d + d * rank + d."""
        return latent_dim * (rank + 2)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return (mu ``(N, d)``, F ``(N, d, rank)``, cov_diag ``(N, d)``)."""
        d = self.latent_dim
        loc, factor, raw_scale = self.encoder(x).split([d, d * self.rank, d], dim=-1)
        factor = factor.reshape(*factor.shape[:-1], d, self.rank)
        return loc, factor, softplus_floor(raw_scale, self.scale_floor).square()

    def posterior(self, x: torch.Tensor) -> dist.LowRankMultivariateNormal:
        """q(z|x): batch shape ``(N,)``, event shape ``(d,)``."""
        loc, factor, cov_diag = self.encode(x)
        return dist.LowRankMultivariateNormal(loc, factor, cov_diag)
