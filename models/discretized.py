"""The discretized logistic distribution over 8-bit intensities k/255 (PixelCNN++).

A scalar distribution (event_shape ``()``); a likelihood makes pixels an event with
``.to_event(1)``. Kept apart from :mod:`pyro_vae.models.likelihoods` because it is a
distribution, not a likelihood module.
"""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions.utils import broadcast_all
from torch.nn import functional as F

__all__ = ["BINS", "DiscretizedLogistic", "log1mexp"]

#: intensity levels of 8-bit data: x = k / (BINS - 1), k = 0 .. BINS - 1
BINS = 256
_STEP = 1.0 / (BINS - 1)  # bin width; bins are centred on k / 255


def log1mexp(t: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-t)) for t > 0, accurate for small and large t (Maechler 2012)."""
    return torch.where(
        t < 0.6931471805599453,
        torch.log(-torch.expm1(-t)),
        torch.log1p(-torch.exp(-t)),
    )


class DiscretizedLogistic(TorchDistribution):
    r"""x in {0, 1/255, ..., 1}: a Logistic(loc, scale) rounded to the nearest bin.

    With h = 1/510 (half a bin), a = (x + h - loc)/scale and b = (x - h - loc)/scale:

    .. math::
        P(x) = \sigma(a) - \sigma(b) \text{ (middle bins)},\quad
        P(0) = \sigma(a),\quad P(1) = 1 - \sigma(b),

    so the 256 probabilities sum to 1 (the edge bins take the logistic's tails). The
    middle bins use the exact identity
    log(sigma(a) - sigma(b)) = log sigma(a) - softplus(b) + log(1 - exp(-(a - b))),
    where a - b = 1/(255 scale) is computed directly. Every term is finite for finite
    arguments, so no difference of nearly equal CDFs ever underflows, and the fallback
    of PixelCNN++ (the density at the bin centre times the bin width) is not needed.

    ``log_prob`` snaps values to the nearest bin k/255 first. ``mean`` is
    clamp(loc, 0, 1): the mean of the logistic clipped to the data range, an
    approximation (exact only when the tails beyond 0 and 1 are symmetric or
    negligible). ``sample`` draws a logistic and rounds it to the nearest bin.

    Args:
        loc: the logistic's location, any real.
        scale: the logistic's scale, > 0.

    References:
        Salimans, Karpathy, Chen & Kingma (2017), PixelCNN++, arXiv:1701.05517, eq. 2.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor,
        validate_args: bool | None = None,
    ) -> None:
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(
        self, batch_shape: torch.Size, _instance: DiscretizedLogistic | None = None
    ) -> DiscretizedLogistic:
        new = self._get_checked_instance(DiscretizedLogistic, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(DiscretizedLogistic, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return self.loc.clamp(0.0, 1.0)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            tiny = torch.finfo(self.loc.dtype).tiny
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
            u = u.clamp(tiny, 1.0 - torch.finfo(self.loc.dtype).eps)
            x = self.loc + self.scale * (torch.log(u) - torch.log1p(-u))
            return (torch.round(x / _STEP) * _STEP).clamp(0.0, 1.0)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        k = torch.round(value / _STEP)
        # Bin k's upper edge is bin k+1's lower edge to the last bit, so the 256
        # probabilities telescope to 1 even for scales far below the bin width.
        a = ((k + 0.5) * _STEP - self.loc) / self.scale
        b = ((k - 0.5) * _STEP - self.loc) / self.scale
        log_cdf_a = F.logsigmoid(a)  # log P(0): the lower edge bin
        log_sf_b = -F.softplus(b)  # log P(1): the upper edge bin
        middle = log_cdf_a - F.softplus(b) + log1mexp(_STEP / self.scale)
        return torch.where(
            k <= 0, log_cdf_a, torch.where(k >= BINS - 1, log_sf_b, middle)
        )
