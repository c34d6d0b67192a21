"""The VAE generative model p(z) p_theta(x | z), written as one Pyro program.

The contract every model in pyro_vae keeps, so that losses, training and evaluation
work on it without knowing its class:

* ``model(x)`` takes a batch ``x`` of shape ``(N, D)`` (flattened data);
* it opens ``pyro.plate("data", N)`` and, inside it, samples the latent site ``"z"``
  (event_dim 1, batch shape ``(N,)``) and observes the site ``"x"`` (event_dim 1),
  so every ``log_prob`` has shape ``(N,)`` (``(P, N)`` with P vectorized particles);
* its networks and learnable parameters are submodules, found by
  ``module.parameters()``; nothing goes to Pyro's global parameter store.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

__all__ = ["VAE"]

Prior = dist.Distribution | Callable[[], dist.Distribution]
Likelihood = Callable[[torch.Tensor], dist.Distribution]


class VAE(PyroModule):
    r"""p(x, z) = p(z) p(x | z), with p(x | z) = likelihood(decoder(z)).

    .. math:: \log p(x, z) = \log p(z) + \log p(x \mid \mathrm{likelihood}(f_\theta(z)))

    Args:
        prior: a distribution over z with event_dim 1 (e.g.
            ``dist.Normal(torch.zeros(d), 1.0).to_event(1)``), or a module/callable
            returning one (learnable priors).
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
        self.prior = prior
        self.decoder = decoder
        self.likelihood = likelihood

    def prior_dist(self) -> dist.Distribution:
        """p(z) as a distribution with event_dim 1."""
        # Pyro distributions are callable (they sample), so test the type first.
        if isinstance(self.prior, dist.Distribution):
            return self.prior
        return self.prior()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior_dist())
            return pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)
