"""The generative side: priors p(z), likelihoods p(x|z), decoders and the VAE model.

Installed as ``pyro_vae.models`` from the repo's top-level ``models/`` folder. Imports
torch, pyro and :mod:`pyro_vae.nn` only; never :mod:`pyro_vae.guides`.

The registries :data:`PRIORS`, :data:`LIKELIHOODS` and :data:`DECODERS` map a
command-line name to a factory; each lives beside the parts it names.
"""

from __future__ import annotations

from .decoders import DECODERS, conv_decoder, mlp_decoder
from .likelihoods import (
    LIKELIHOODS,
    AbstractLikelihood,
    BernoulliLikelihood,
    GaussianLikelihood,
    LearnedGaussianLikelihood,
)
from .linear_gaussian import LinearGaussian, PosteriorGuide
from .priors import (
    PRIORS,
    LearnedNormalPrior,
    MixtureOfGaussiansPrior,
    StandardNormalPrior,
    StudentTPrior,
    VampPrior,
)
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
    "LearnedNormalPrior",
    "MixtureOfGaussiansPrior",
    "LinearGaussian",
    "PosteriorGuide",
    "StandardNormalPrior",
    "StudentTPrior",
    "VampPrior",
    "conv_decoder",
    "mlp_decoder",
]
