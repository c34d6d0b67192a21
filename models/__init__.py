"""The generative side: priors p(z), likelihoods p(x|z), decoders and the VAE model.

Installed as ``pyro_vae.models`` from the repo's top-level ``models/`` folder. Imports
torch, pyro and :mod:`pyro_vae.nn` only; never :mod:`pyro_vae.guides`.

The registries map a command-line name to a factory; the CLI looks names up here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from pyro_vae.nn import mlp

from .likelihoods import (
    AbstractLikelihood,
    BernoulliLikelihood,
    GaussianLikelihood,
    LearnedGaussianLikelihood,
)
from .linear_gaussian import LinearGaussian, PosteriorGuide
from .priors import StandardNormalPrior
from .vae import VAE

__all__ = [
    "DECODERS",
    "LIKELIHOODS",
    "PRIORS",
    "VAE",
    "AbstractLikelihood",
    "BernoulliLikelihood",
    "GaussianLikelihood",
    "LearnedGaussianLikelihood",
    "LinearGaussian",
    "PosteriorGuide",
    "StandardNormalPrior",
    "mlp_decoder",
]


def mlp_decoder(
    latent_dim: int, out_features: int, hidden: Sequence[int], activation: str = "relu"
) -> nn.Module:
    """An MLP decoder from z ``(..., d)`` to likelihood parameters ``(..., out)``."""
    return mlp(latent_dim, hidden, out_features, activation)


#: name -> factory(latent_dim) returning a prior module
PRIORS: dict[str, Callable[..., nn.Module]] = {
    "normal": StandardNormalPrior,
}

#: name -> factory(**options) returning a likelihood module; options a factory does
#: not use are ignored, so the CLI can pass every likelihood option to any of them.
LIKELIHOODS: dict[str, Callable[..., AbstractLikelihood]] = {
    "bernoulli": lambda **_: BernoulliLikelihood(),
    "gaussian": lambda sigma=1.0, **_: GaussianLikelihood(sigma),
    "gaussian-learned": lambda sigma=1.0, sigma_floor=1e-3, **_: (
        LearnedGaussianLikelihood(sigma, sigma_floor)
    ),
}

#: name -> factory(latent_dim, out_features, hidden, activation)
DECODERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp_decoder,
}
