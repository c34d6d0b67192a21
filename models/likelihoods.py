"""Likelihoods p(x | z): modules mapping decoder output to a distribution over x.

Contract: ``likelihood(out)`` takes the decoder output of shape ``(..., N, k * D)``,
where ``k = likelihood.params_per_feature``, and returns a distribution with
``event_shape == (D,)`` and batch shape ``(..., N)``. ``check_data(x)`` raises a
``ValueError`` that names the problem and the fix when data lie outside the support.
Adding a likelihood is one small class with these two methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_vae.nn import softplus_floor

__all__ = [
    "LIKELIHOODS",
    "AbstractLikelihood",
    "BernoulliLikelihood",
    "GaussianLikelihood",
    "LearnedGaussianLikelihood",
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


class BernoulliLikelihood(AbstractLikelihood):
    """x_i | z ~ Bernoulli(sigmoid(decoder(z)_i)), independent over pixels.

    log p(x|z) = sum_i x_i * l_i - softplus(l_i) on logits l (AEVB appendix C.1). The
    data must be binary: binarize grey levels first (``--binarize dynamic|static``).
    """

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=out).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        super().check_data(x)
        non_binary = ((x != 0) & (x != 1)).sum().item()
        if non_binary:
            raise ValueError(
                f"the Bernoulli likelihood needs binary data in {{0, 1}}, but "
                f"{non_binary} of {x.numel()} values are neither 0 nor 1. Binarize "
                "them (--binarize dynamic or --binarize static) or choose a "
                "continuous likelihood (--likelihood gaussian)."
            )


class GaussianLikelihood(AbstractLikelihood):
    """x_i | z ~ N(decoder(z)_i, sigma^2) with a fixed sigma.

    With sigma = 1, -log p(x|z) = ||x - mu||^2 / 2 + (D/2) log(2 pi): the squared
    error of a plain autoencoder plus a constant (AEVB appendix C.2).

    Args:
        sigma: the fixed observation noise, > 0.
    """

    def __init__(self, sigma: float = 1.0) -> None:
        super().__init__()
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"--sigma must be a positive finite number, got {sigma}")
        self.sigma = float(sigma)

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        return dist.Normal(out, self.sigma).to_event(1)


class LearnedGaussianLikelihood(AbstractLikelihood):
    """x_i | z ~ N(decoder(z)_i, sigma^2) with one learned sigma for all pixels.

    sigma = softplus(rho) + floor; the floor keeps log p(x|z) bounded when a pixel is
    constant (MNIST's border), where an unfloored sigma would shrink to zero.

    Args:
        init_sigma: sigma at initialization, > floor.
        floor: the smallest sigma allowed.
    """

    def __init__(self, init_sigma: float = 1.0, floor: float = 1e-3) -> None:
        super().__init__()
        if not (0 < floor < init_sigma < math.inf):
            raise ValueError(
                f"need 0 < sigma floor < initial sigma, got floor={floor}, "
                f"init_sigma={init_sigma}"
            )
        self.floor = float(floor)
        # Invert softplus so that sigma starts at init_sigma exactly; this form of
        # log(expm1(y)) does not overflow for large y.
        y = init_sigma - floor
        rho = y + math.log(-math.expm1(-y))
        self.rho = nn.Parameter(torch.tensor(rho))

    @property
    def sigma(self) -> torch.Tensor:
        return softplus_floor(self.rho, self.floor)

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        return dist.Normal(out, self.sigma).to_event(1)


#: name -> factory(**options) returning a likelihood module. The builder passes every
#: likelihood option (``data_dim``, ``sigma``, ``sigma_floor``, ...) to every factory;
#: each takes the ones it uses and ignores the rest.
LIKELIHOODS: dict[str, Callable[..., AbstractLikelihood]] = {
    "bernoulli": lambda **_: BernoulliLikelihood(),
    "gaussian": lambda sigma=1.0, **_: GaussianLikelihood(sigma),
    "gaussian-learned": lambda sigma=1.0, sigma_floor=1e-3, **_: (
        LearnedGaussianLikelihood(sigma, sigma_floor)
    ),
}
