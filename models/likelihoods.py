"""Likelihoods p(x | z): modules mapping decoder output to a distribution over x.

Contract: ``likelihood(out)`` takes the decoder output of shape ``(..., N, k * D)``,
where ``k = likelihood.params_per_feature``, and returns a distribution with
``event_shape == (D,)`` and batch shape ``(..., N)``. ``check_data(x)`` raises a
``ValueError`` that names the problem and the fix when data lie outside the support.
Adding a likelihood is one small class with these two methods.

This file holds the likelihoods for data in [0, 1] and the registry; the Gaussian and
Laplace likelihoods on the real line are in :mod:`pyro_vae.models.real_likelihoods`,
their base in :mod:`pyro_vae.models.likelihood_base`. All are importable from here.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from pyro_vae.nn import registry_entry, softplus_floor

from .discretized import BINS, DiscretizedLogistic
from .likelihood_base import (
    UNIT_FIX,
    AbstractLikelihood,
    check_unit_interval,
    inverse_softplus_floor,
    positive_floor,
)
from .real_likelihoods import (
    DecoderGaussianLikelihood,
    GaussianLikelihood,
    LaplaceLikelihood,
    LearnedGaussianLikelihood,
    PixelGaussianLikelihood,
)

__all__ = [
    "BETA_EPS",
    "LIKELIHOODS",
    "AbstractLikelihood",
    "BernoulliLikelihood",
    "BetaLikelihood",
    "ClampedBeta",
    "ContinuousBernoulliLikelihood",
    "DecoderGaussianLikelihood",
    "DiscretizedLogisticLikelihood",
    "GaussianLikelihood",
    "LaplaceLikelihood",
    "LearnedGaussianLikelihood",
    "PixelGaussianLikelihood",
    "inverse_softplus_floor",
]

#: the Beta likelihood clamps observations to [BETA_EPS, 1 - BETA_EPS]
BETA_EPS = 1e-3


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


class ContinuousBernoulliLikelihood(AbstractLikelihood):
    """x_i | z ~ ContinuousBernoulli(sigmoid(decoder(z)_i)) for x in [0, 1].

    log p(x|z) = sum_i x_i l_i - softplus(l_i) + C(lambda_i) on logits l, with
    lambda = sigmoid(l) and the log normalizer
    C(lambda) = log(2 atanh(1 - 2 lambda) / (1 - 2 lambda)), C(1/2) = log 2; Pyro's
    ``ContinuousBernoulli`` includes C (a Taylor series near 1/2). Without C this is
    the Bernoulli "likelihood" of grey-level data, which is not a density.

    References:
        Loaiza-Ganem & Cunningham (2019), The continuous Bernoulli: fixing a pervasive
        error in variational autoencoders, arXiv:1907.06845, eq. 7.
    """

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=out).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        super().check_data(x)
        check_unit_interval(x, "continuous-bernoulli", UNIT_FIX)


class ClampedBeta(dist.Beta):
    """Beta whose ``log_prob`` clamps values to [BETA_EPS, 1 - BETA_EPS] first.

    Its support is the closed [0, 1], so Pyro's validation admits observed 0s and 1s.
    """

    support = constraints.unit_interval

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return super().log_prob(value.clamp(BETA_EPS, 1.0 - BETA_EPS))


class BetaLikelihood(AbstractLikelihood):
    """x_i | z ~ Beta(alpha_i(z), beta_i(z)) for grey levels x in [0, 1].

    alpha = softplus(first block) + floor, beta = softplus(second block) + floor.
    With x' = clamp(x, eps, 1 - eps), eps = 1e-3 (:data:`BETA_EPS`):

    log p(x|z) = sum_i (alpha_i - 1) log x'_i + (beta_i - 1) log(1 - x'_i)
    + lgamma(alpha_i + beta_i) - lgamma(alpha_i) - lgamma(beta_i).

    Clamping rule: grey-level data hold exact 0s and 1s, where the Beta density is 0
    or infinite, so observed values are clamped to [eps, 1 - eps] before the density
    is evaluated (:class:`ClampedBeta`); samples and means are the Beta's own.

    Args:
        floor: the smallest concentration allowed (``--sigma-floor``).

    References:
        Loaiza-Ganem & Cunningham (2019), arXiv:1907.06845, section 5 (Beta
        likelihood baseline).
    """

    params_per_feature = 2

    def __init__(self, floor: float = 1e-3) -> None:
        super().__init__()
        self.floor = positive_floor(floor)

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        a, b = softplus_floor(out, self.floor).chunk(2, dim=-1)
        return ClampedBeta(a, b).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        super().check_data(x)
        check_unit_interval(x, "beta", UNIT_FIX)
        if bool(((x == 0) | (x == 1)).all()):
            raise ValueError(
                "the beta likelihood needs grey levels in (0, 1), but the data are all "
                "0 or 1 (binarized?), where a clamped Beta density is unbounded. Use "
                "--likelihood bernoulli for binary data, or --binarize none."
            )


class DiscretizedLogisticLikelihood(AbstractLikelihood):
    """x_i | z ~ DiscretizedLogistic(mu_i(z), s_i(z)) for 8-bit data x = k/255.

    mu = first block, s = softplus(second block) + floor. log p(x|z) = sum_i log P(x_i)
    with P(x) = sigma((x + 1/510 - mu)/s) - sigma((x - 1/510 - mu)/s), the edge bins
    x = 0 and x = 1 taking the tails (:class:`.discretized.DiscretizedLogistic`): a
    log probability (<= 0, comparable with bits per dimension), not a density.

    Args:
        floor: the smallest scale s allowed.

    References:
        Salimans, Karpathy, Chen & Kingma (2017), PixelCNN++, arXiv:1701.05517.
    """

    params_per_feature = 2

    def __init__(self, floor: float = 1e-3) -> None:
        super().__init__()
        self.floor = positive_floor(floor)

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        loc, raw = out.chunk(2, dim=-1)
        return DiscretizedLogistic(loc, softplus_floor(raw, self.floor)).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        super().check_data(x)
        fix = (
            "it models 8-bit intensities k/255: load uint8 data and divide by 255, "
            "or use --binarize none with a continuous likelihood (--likelihood beta, "
            "continuous-bernoulli or gaussian)"
        )
        check_unit_interval(x, "discretized-logistic", fix)
        off_grid = (x * (BINS - 1) - torch.round(x * (BINS - 1))).abs() / (BINS - 1)
        n_off = (off_grid > 1e-6).sum().item()
        if n_off:
            raise ValueError(
                f"the discretized-logistic likelihood needs data on the grid k/255, "
                f"but {n_off} of {x.numel()} values are off it (by up to "
                f"{off_grid.max().item():.3g}); {fix}"
            )


#: the keywords the builder offers every likelihood factory (see
#: :mod:`pyro_vae.cli.parts`)
LIKELIHOOD_KEYWORDS = ("data_dim", "latent_dim", "sigma", "sigma_floor")


def _bernoulli() -> AbstractLikelihood:
    return BernoulliLikelihood()


def _gaussian(sigma: float = 1.0) -> AbstractLikelihood:
    return GaussianLikelihood(sigma)


def _gaussian_learned(
    sigma: float = 1.0, sigma_floor: float = 1e-3
) -> AbstractLikelihood:
    return LearnedGaussianLikelihood(sigma, sigma_floor)


def _gaussian_pixel(
    data_dim: int | None = None, sigma: float = 1.0, sigma_floor: float = 1e-3
) -> AbstractLikelihood:
    return PixelGaussianLikelihood(data_dim, sigma, sigma_floor)


def _gaussian_decoder(
    sigma: float = 1.0, sigma_floor: float = 1e-3
) -> AbstractLikelihood:
    return DecoderGaussianLikelihood(sigma, sigma_floor)


def _laplace(sigma: float = 1.0, sigma_floor: float = 1e-3) -> AbstractLikelihood:
    return LaplaceLikelihood(sigma, sigma_floor)


def _continuous_bernoulli() -> AbstractLikelihood:
    return ContinuousBernoulliLikelihood()


def _beta(sigma_floor: float = 1e-3) -> AbstractLikelihood:
    return BetaLikelihood(sigma_floor)


def _discretized_logistic(sigma_floor: float = 1e-3) -> AbstractLikelihood:
    return DiscretizedLogisticLikelihood(sigma_floor)


#: name -> factory returning a likelihood module. Each factory names the options it
#: takes (``sigma``, ``sigma_floor``, ``data_dim``); the builder passes it those, of
#: :data:`LIKELIHOOD_KEYWORDS`.
LIKELIHOODS: dict[str, Callable[..., AbstractLikelihood]] = {
    name: registry_entry("likelihood", name, factory, LIKELIHOOD_KEYWORDS)
    for name, factory in [
        ("bernoulli", _bernoulli),
        ("gaussian", _gaussian),
        ("gaussian-learned", _gaussian_learned),
        ("gaussian-pixel", _gaussian_pixel),
        ("gaussian-decoder", _gaussian_decoder),
        ("laplace", _laplace),
        ("continuous-bernoulli", _continuous_bernoulli),
        ("beta", _beta),
        ("discretized-logistic", _discretized_logistic),
    ]
}
