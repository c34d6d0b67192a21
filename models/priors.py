"""Priors p(z): modules whose ``forward()`` returns a distribution with event_dim 1.

A prior is called with no arguments inside the model's data plate, and returns a
distribution whose ``event_shape`` is ``(latent_dim,)`` and whose batch shape is
``()``; the plate broadcasts it over the data. A prior with learnable parameters
registers them as ordinary module parameters, so they train with everything else.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

__all__ = ["PRIORS", "StandardNormalPrior"]


class StandardNormalPrior(PyroModule):
    """p(z) = N(0, I_d), the AEVB prior (Kingma & Welling, 2014, section 3).

    Args:
        latent_dim: d, the size of z.
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")
        self.latent_dim = latent_dim
        # Buffers, not parameters: they follow .to(device) but are never trained.
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


#: name -> factory(latent_dim, **options) returning a prior module. Options the
#: builder passes: ``components``, ``pseudo_inputs``, ``df``, ``data_dim`` and
#: ``posterior`` (the guide's x -> q(z|x), for the VampPrior); each factory takes
#: what it uses.
PRIORS: dict[str, Callable[..., nn.Module]] = {
    "normal": lambda latent_dim, **_: StandardNormalPrior(latent_dim),
}
