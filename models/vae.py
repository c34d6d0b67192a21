"""The VAE generative model p(z) p_theta(x | z), written as one Pyro program.

The contract every model in pyro_vae keeps, so that losses, training and evaluation
work on it without knowing its class:

* ``model(x)`` takes a batch ``x`` of shape ``(N, D)`` (flattened data);
* it opens ``pyro.plate("data", N)`` and, inside it, samples the latent site ``"z"``
  (event_dim 1, batch shape ``(N,)``) and observes the site ``"x"`` (event_dim 1),
  so every ``log_prob`` has shape ``(N,)`` (``(P, N)`` with P vectorized particles);
* ``model(n=N)`` (no data) is the same program with ``"x"`` sampled, not observed:
  it returns N draws from p(x);
* its networks and learnable parameters are submodules, found by
  ``module.parameters()``; nothing goes to Pyro's global parameter store. A prior
  handed in as a distribution is kept as a :class:`DistributionPrior` module, so its
  tensors are buffers that follow ``.to(device)`` / ``.to(dtype)`` and the state dict.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import Distribution

from .distribution_prior import PASS_A_MODULE, DistributionPrior

__all__ = ["VAE", "DistributionPrior", "data_size"]

Prior = Distribution | Callable[[], Distribution]
Likelihood = Callable[[torch.Tensor], Distribution]


def data_size(x: torch.Tensor | None, n: int | None) -> int:
    """The size of the data plate: ``len(x)`` when data are given, else ``n``."""
    if x is None:
        if n is None:
            raise ValueError(
                "give the data x (N, D) to score them, or a number n of draws to "
                "sample, e.g. model(n=16)"
            )
        if int(n) < 1:
            raise ValueError(f"n must be a positive number of draws, got {n}")
        return int(n)
    if n is not None and n != x.shape[0]:
        raise ValueError(f"n={n} does not match the {x.shape[0]} rows of x")
    return x.shape[0]


class VAE(PyroModule):
    r"""p(x, z) = p(z) p(x | z), with p(x | z) = likelihood(decoder(z)).

    .. math:: \log p(x, z) = \log p(z) + \log p(x \mid \mathrm{likelihood}(f_\theta(z)))

    Args:
        prior: a module (or callable) returning a distribution over z with event_dim
            1 (learnable priors, :mod:`pyro_vae.models.priors`), or such a
            distribution itself (e.g. ``dist.Normal(torch.zeros(d), 1.0)
            .to_event(1)``), which is kept as a :class:`DistributionPrior` so that it
            follows ``.to(device/dtype)`` and is saved with the model.
        decoder: a network mapping z ``(..., N, d)`` to the likelihood's parameters.
        likelihood: a callable mapping decoder output to a distribution over x with
            event_dim 1 (see :mod:`pyro_vae.models.likelihoods`).

    References:
        Kingma & Welling (2014), Auto-Encoding Variational Bayes, arXiv:1312.6114.
    """

    def __init__(
        self, prior: Prior, decoder: nn.Module, likelihood: Likelihood
    ) -> None:
        super().__init__()
        if isinstance(prior, Distribution):
            prior = DistributionPrior(prior)
        elif isinstance(prior, dist.Distribution):  # a Pyro-only distribution
            raise TypeError(
                f"cannot keep the prior {type(prior).__name__} as a module; "
                + PASS_A_MODULE
            )
        self.prior = prior
        self.decoder = decoder
        self.likelihood = likelihood

    def prior_dist(self) -> Distribution:
        """p(z) as a distribution with event_dim 1."""
        return self.prior()

    def conditional(self, z: torch.Tensor) -> Distribution:
        """p(x | z) as a distribution with event_dim 1, for codes z ``(..., d)``."""
        return self.likelihood(self.decoder(z))

    def forward(
        self, x: torch.Tensor | None = None, n: int | None = None
    ) -> torch.Tensor:
        """Score the data ``x`` (``"x"`` observed), or draw ``n`` of them (sampled).

        Returns ``x`` itself when given, else the draws ``(n, D)``.
        """
        with pyro.plate("data", data_size(x, n)):
            z = pyro.sample("z", self.prior_dist())
            return pyro.sample("x", self.conditional(z), obs=x)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n draws x ~ p(x) = ∫ p(z) p(x|z) dz, shape ``(n, D)``, without gradients."""
        return self(n=n)
