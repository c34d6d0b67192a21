"""The inference side: amortized guides q(z|x) and their encoders.

Installed as ``pyro_vae.guides`` from the repo's top-level ``guides/`` folder. Imports
torch, pyro and :mod:`pyro_vae.nn` only; never :mod:`pyro_vae.models`. A guide's
``forward(x)`` samples the site ``"z"`` (event_dim 1) inside ``pyro.plate("data", N)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from pyro_vae.nn import mlp

from .gaussian import DiagonalNormalGuide

__all__ = ["GUIDES", "DiagonalNormalGuide", "mlp_diagonal_guide"]


def mlp_diagonal_guide(
    data_dim: int, latent_dim: int, hidden: Sequence[int], activation: str = "relu"
) -> nn.Module:
    """A diagonal-Normal guide whose encoder is an MLP ``D -> hidden -> 2d``."""
    encoder = mlp(data_dim, hidden, 2 * latent_dim, activation)
    return DiagonalNormalGuide(encoder, latent_dim)


#: name -> factory(data_dim, latent_dim, hidden, activation) returning a guide module
GUIDES: dict[str, Callable[..., nn.Module]] = {
    "diagonal": mlp_diagonal_guide,
}
