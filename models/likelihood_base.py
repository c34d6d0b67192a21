"""The base of the built-in likelihoods and the checks and σ parametrization they share.

See :mod:`pyro_vae.models.likelihoods` for the contract a likelihood meets.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

__all__ = [
    "UNIT_FIX",
    "AbstractLikelihood",
    "check_unit_interval",
    "inverse_softplus_floor",
    "positive_floor",
]


class AbstractLikelihood(PyroModule):
    """Base of the built-in likelihoods; subclasses implement ``forward``."""

    #: decoder outputs per data feature (2 for a likelihood that predicts loc and scale)
    params_per_feature: int = 1

    def forward(self, out: torch.Tensor) -> dist.Distribution:  # pragma: no cover
        raise NotImplementedError

    def check_data(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless every value of ``x`` is finite."""
        if not torch.isfinite(x).all():
            raise ValueError(
                f"{type(self).__name__} got non-finite data; remove or impute NaN and "
                "inf values before training"
            )


def inverse_softplus_floor(value: float, floor: float) -> float:
    """The raw rho with ``softplus(rho) + floor == value``; needs 0 < floor < value."""
    if not (0 < floor < value < math.inf):
        raise ValueError(
            f"need 0 < sigma floor < initial sigma, got floor={floor}, "
            f"init_sigma={value}; raise --sigma or lower --sigma-floor"
        )
    y = value - floor
    return y + math.log(-math.expm1(-y))  # log(expm1(y)) without overflow


def positive_floor(floor: float) -> float:
    if not (0 < floor < math.inf):
        raise ValueError(f"--sigma-floor must be positive and finite, got {floor}")
    return float(floor)


def check_unit_interval(x: torch.Tensor, name: str, fix: str) -> None:
    """Raise ``ValueError`` naming the range found unless all of ``x`` is in [0, 1]."""
    lo, hi = x.min().item(), x.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(
            f"the {name} likelihood needs data in [0, 1], but the values range over "
            f"[{lo:.6g}, {hi:.6g}]; {fix}"
        )


UNIT_FIX = (
    "rescale them to [0, 1] (e.g. divide 8-bit intensities by 255) or use a "
    "likelihood on the real line (--likelihood gaussian, gaussian-learned or laplace)"
)
