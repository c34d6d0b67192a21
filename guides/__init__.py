"""The inference side: amortized guides q(z|x) and their encoders.

Installed as ``pyro_vae.guides`` from the repo's top-level ``guides/`` folder. Imports
torch, pyro and :mod:`pyro_vae.nn` only; never :mod:`pyro_vae.models`.

The guide contract: ``guide(x)`` takes a batch ``(N, D)`` and samples the site ``"z"``
(event_dim 1) inside ``pyro.plate("data", N)``; ``guide.posterior(x)`` returns q(z|x)
as a distribution with batch shape ``(N,)`` and event shape ``(d,)`` (the VampPrior
uses it on its pseudo-inputs). Networks are submodules.

:data:`GUIDES` maps a command-line name to ``factory(make_encoder, latent_dim,
**options)``, where ``make_encoder(out_features)`` builds the encoder network (MLP or
conv, see :data:`ENCODERS`) with the output width the guide asks for; options a
factory does not use are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from pyro_vae.nn import mlp

from .encoders import ENCODERS
from .gaussian import DiagonalNormalGuide

__all__ = ["ENCODERS", "GUIDES", "DiagonalNormalGuide", "mlp_diagonal_guide"]


def mlp_diagonal_guide(
    data_dim: int, latent_dim: int, hidden: Sequence[int], activation: str = "relu"
) -> nn.Module:
    """A diagonal-Normal guide whose encoder is an MLP ``D -> hidden -> 2d``."""
    encoder = mlp(data_dim, hidden, 2 * latent_dim, activation)
    return DiagonalNormalGuide(encoder, latent_dim)


#: name -> factory(make_encoder, latent_dim, **options) returning a guide module
GUIDES: dict[str, Callable[..., nn.Module]] = {
    "diagonal": lambda make_encoder, latent_dim, **_: DiagonalNormalGuide(
        make_encoder(2 * latent_dim), latent_dim
    ),
}
