"""Objectives beside the ELBO: the InfoVAE family with its MMD kernels, the IWAE
bound (reparameterized or DReG gradients) and the ELBO with STL gradients.

Imports torch, pyro and :mod:`pyro_vae.errors` only; never :mod:`pyro_vae.models`
or :mod:`pyro_vae.guides`: every loss here works on any (model, guide) pair that
keeps the site contract.
"""

from pyro_vae.losses.infovae import PRESETS, Trace_InfoVAE, infovae_preset
from pyro_vae.losses.iwae import IWAE_ESTIMATORS, Trace_IWAE
from pyro_vae.losses.kernels import BANDWIDTH_RULES, KERNELS, MULTI_SCALES, Kernel
from pyro_vae.losses.mmd import mmd2
from pyro_vae.losses.particles import SiteContractError
from pyro_vae.losses.select import (
    GRAD_ESTIMATORS,
    LOSSES,
    describe_objective,
    make_kernel,
    make_objective,
)
from pyro_vae.losses.stl import TraceSTL_ELBO

__all__ = [
    "BANDWIDTH_RULES",
    "GRAD_ESTIMATORS",
    "IWAE_ESTIMATORS",
    "KERNELS",
    "LOSSES",
    "MULTI_SCALES",
    "PRESETS",
    "Kernel",
    "SiteContractError",
    "TraceSTL_ELBO",
    "Trace_IWAE",
    "Trace_InfoVAE",
    "describe_objective",
    "infovae_preset",
    "make_kernel",
    "make_objective",
    "mmd2",
]
