"""Objectives beside the ELBO: the InfoVAE family with its MMD kernels.

Imports torch, pyro and :mod:`pyro_vae.errors` only; never :mod:`pyro_vae.models`
or :mod:`pyro_vae.guides`: every loss here works on any (model, guide) pair that
keeps the site contract.
"""

from pyro_vae.losses.infovae import PRESETS, Trace_InfoVAE, infovae_preset
from pyro_vae.losses.kernels import BANDWIDTH_RULES, KERNELS, MULTI_SCALES, Kernel
from pyro_vae.losses.mmd import mmd2
from pyro_vae.losses.select import LOSSES, make_kernel, make_objective

__all__ = [
    "BANDWIDTH_RULES",
    "KERNELS",
    "LOSSES",
    "MULTI_SCALES",
    "PRESETS",
    "Kernel",
    "Trace_InfoVAE",
    "infovae_preset",
    "make_kernel",
    "make_objective",
    "mmd2",
]
