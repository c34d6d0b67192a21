r"""The linear-Gaussian VAE (probabilistic PCA): an exact oracle for the estimators.

.. math::
    z \sim N(0, I_d), \qquad x \mid z \sim N(W z + b, \sigma^2 I_D)

Everything is closed form (Tipping & Bishop, 1999):

* marginal: :math:`\log p(x) = \log N(x; b, W W^\top + \sigma^2 I)`;
* posterior: :math:`p(z \mid x) = N(\Sigma W^\top (x - b) / \sigma^2, \Sigma)` with
  :math:`\Sigma = (I + W^\top W / \sigma^2)^{-1}`.

:class:`PosteriorGuide` is q(z|x) built from the exact posterior, optionally shifted and
widened, so that KL(q || p(z|x)) is known too. Tests use these to check the ELBO,
IWAE and importance-sampled estimators against exact answers.

References:
    Tipping & Bishop (1999), Probabilistic Principal Component Analysis, JRSS B 61(3).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from .vae import data_size

__all__ = ["LinearGaussian", "PosteriorGuide"]


class LinearGaussian(PyroModule):
    """pPCA as a Pyro model with sites ``z`` and ``x`` in the ``data`` plate.

    Args:
        weight: W, shape ``(D, d)``.
        bias: b, shape ``(D,)``.
        sigma: the observation noise, > 0.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, sigma: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.sigma = float(sigma)

    @property
    def latent_dim(self) -> int:
        return self.weight.shape[1]

    def forward(
        self, x: torch.Tensor | None = None, n: int | None = None
    ) -> torch.Tensor:
        """Score ``x`` (``"x"`` observed), or draw ``n`` data (``"x"`` sampled)."""
        zeros = self.weight.new_zeros(self.latent_dim)
        with pyro.plate("data", data_size(x, n)):
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
            loc = z @ self.weight.T + self.bias
            return pyro.sample("x", dist.Normal(loc, self.sigma).to_event(1), obs=x)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n draws x ~ p(x), shape ``(n, D)``."""
        return self(n=n)

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per datum, shape ``(N,)``."""
        dim = self.weight.shape[0]
        cov = self.weight @ self.weight.T + self.sigma**2 * torch.eye(dim).to(x)
        return dist.MultivariateNormal(self.bias, covariance_matrix=cov).log_prob(x)

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """Exact p(z | x), batch shape ``(N,)``, event shape ``(d,)``."""
        w, s2 = self.weight, self.sigma**2
        precision = torch.eye(self.latent_dim).to(w) + w.T @ w / s2
        cov = torch.linalg.inv(precision)
        loc = (x - self.bias) @ w @ cov.T / s2
        return dist.MultivariateNormal(loc, covariance_matrix=cov)


class PosteriorGuide(PyroModule):
    """q(z|x): the oracle's exact posterior, shifted and scaled on purpose.

    q(z|x) = N(m(x) + shift, scale^2 * S), where p(z|x) = N(m(x), S). With
    ``diagonal=True`` S keeps only its diagonal (a mean-field guide).

    Args:
        oracle: the :class:`LinearGaussian` model.
        shift: added to every coordinate of the posterior mean.
        scale: multiplies the posterior standard deviations.
        diagonal: use a diagonal covariance (for analytic-KL estimators).
    """

    def __init__(
        self,
        oracle: LinearGaussian,
        shift: float = 0.0,
        scale: float = 1.0,
        diagonal: bool = False,
    ) -> None:
        super().__init__()
        self.oracle = oracle
        self.shift, self.scale, self.diagonal = shift, scale, diagonal

    def q(self, x: torch.Tensor) -> dist.Distribution:
        """q(z|x) with batch shape ``(N,)`` and event shape ``(d,)``."""
        post = self.oracle.posterior(x)
        loc = post.loc + self.shift
        if self.diagonal:
            std = post.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
            return dist.Normal(loc, self.scale * std).to_event(1)
        return dist.MultivariateNormal(loc, scale_tril=self.scale * post.scale_tril)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.q(x))
