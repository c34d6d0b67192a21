"""Likelihoods on the real line: Gaussian, with σ fixed, learned (global or per
pixel) or predicted by the decoder, always above a floor; and Laplace.

See :mod:`pyro_vae.models.likelihoods` for the contract a likelihood meets.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.nn import softplus_floor

from .likelihood_base import AbstractLikelihood, inverse_softplus_floor

__all__ = [
    "DecoderGaussianLikelihood",
    "GaussianLikelihood",
    "LaplaceLikelihood",
    "LearnedGaussianLikelihood",
    "PixelGaussianLikelihood",
]


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
        self.floor = float(floor)
        self.rho = nn.Parameter(torch.tensor(inverse_softplus_floor(init_sigma, floor)))

    @property
    def sigma(self) -> torch.Tensor:
        return softplus_floor(self.rho, self.floor)

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        return dist.Normal(out, self.sigma).to_event(1)


class PixelGaussianLikelihood(AbstractLikelihood):
    """x_i | z ~ N(decoder(z)_i, sigma_i^2) with one learned sigma per pixel.

    log p(x|z) = sum_i -(x_i - mu_i)^2 / (2 sigma_i^2) - log sigma_i - log(2 pi)/2,
    sigma_i = softplus(rho_i) + floor with rho of shape (D,).

    Args:
        data_dim: D, the number of pixels.
        init_sigma: every sigma_i at initialization, > floor.
        floor: the smallest sigma allowed.

    References:
        Rybkin, Daniilidis & Levine (2021), Simple and Effective VAE Training with
        Calibrated Decoders, arXiv:2006.13202.
    """

    def __init__(
        self, data_dim: int | None, init_sigma: float = 1.0, floor: float = 1e-3
    ) -> None:
        super().__init__()
        if data_dim is None or data_dim < 1:
            raise ValueError(
                "the gaussian-pixel likelihood learns one sigma per pixel and needs "
                f"data_dim >= 1, got {data_dim}; pass data_dim=D"
            )
        self.floor = float(floor)
        rho = inverse_softplus_floor(init_sigma, floor)
        self.rho = nn.Parameter(torch.full((data_dim,), rho))

    @property
    def sigma(self) -> torch.Tensor:
        return softplus_floor(self.rho, self.floor)  # (D,)

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        return dist.Normal(out, self.sigma).to_event(1)


class DecoderGaussianLikelihood(AbstractLikelihood):
    """x_i | z ~ N(mu_i(z), sigma_i(z)^2): the decoder predicts loc and scale.

    mu = first block of the decoder output, sigma = softplus(raw + rho0) + floor from
    the second (rho0 makes sigma = init_sigma at raw = 0); log p(x|z) as for
    :class:`PixelGaussianLikelihood`.

    Args:
        init_sigma: sigma where the decoder's raw scale output is 0, > floor.
        floor: the smallest sigma allowed.

    References:
        Kingma & Welling (2014), Auto-Encoding Variational Bayes, arXiv:1312.6114,
        appendix C.2.
    """

    params_per_feature = 2

    def __init__(self, init_sigma: float = 1.0, floor: float = 1e-3) -> None:
        super().__init__()
        self.floor = float(floor)
        self.rho0 = inverse_softplus_floor(init_sigma, floor)

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        loc, raw = out.chunk(2, dim=-1)
        return dist.Normal(loc, softplus_floor(raw + self.rho0, self.floor)).to_event(1)


class LaplaceLikelihood(AbstractLikelihood):
    """x_i | z ~ Laplace(decoder(z)_i, b) with one learned scale b for all pixels.

    log p(x|z) = sum_i -|x_i - mu_i| / b - log(2 b), b = softplus(rho) + floor: an
    L1 reconstruction error with a learned weight.

    Args:
        init_scale: b at initialization, > floor.
        floor: the smallest b allowed.

    References:
        Kotz, Kozubowski & Podgorski (2001), The Laplace Distribution and
        Generalizations, Birkhauser, ch. 2.
    """

    def __init__(self, init_scale: float = 1.0, floor: float = 1e-3) -> None:
        super().__init__()
        self.floor = float(floor)
        self.rho = nn.Parameter(torch.tensor(inverse_softplus_floor(init_scale, floor)))

    @property
    def scale(self) -> torch.Tensor:
        return softplus_floor(self.rho, self.floor)

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        return dist.Laplace(out, self.scale).to_event(1)
