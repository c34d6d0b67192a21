r"""Positive-definite kernels on latent codes, for MMD.

Both kernels take a squared distance r = ||x - y||^2 and a scale c > 0:

* RBF (Gaussian): k(x, y) = exp(-r / c); with c = 2 l^2 it is exp(-r / (2 l^2)).
* inverse multiquadratic (IMQ): k(x, y) = c / (c + r), whose heavy tails keep
  gradients alive when q(z) and p(z) are far apart (Tolstikhin et al., 2018).

The scale c comes from a bandwidth rule:

* ``fixed``: c = 2 sigma^2 with sigma = ``bandwidth``;
* ``dim``: c = 2 d sigma^2, the InfoVAE/WAE convention that grows with the latent size
  d (sigma = ``bandwidth``, 1 matches N(0, I));
* ``median``: c = the median of the pooled pairwise squared distances (detached), the
  median heuristic (Gretton et al., 2012).

``scales`` multiplies c by several factors and sums the kernels (a multi-scale
kernel); ``(1.0,)`` is a single scale.

References:
    Gretton, Borgwardt, Rasch, Schölkopf & Smola (2012), A Kernel Two-Sample Test,
    JMLR 13. Tolstikhin, Bousquet, Gelly & Schölkopf (2018), Wasserstein
    Auto-Encoders, arXiv:1711.01558.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["BANDWIDTH_RULES", "KERNELS", "Kernel", "MULTI_SCALES"]

KERNELS = ("rbf", "imq")
BANDWIDTH_RULES = ("fixed", "dim", "median")
MULTI_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class Kernel:
    """A kernel family with a bandwidth rule; call ``gram(x, y, c)``.

    Args:
        name: ``"rbf"`` or ``"imq"``.
        rule: ``"fixed"``, ``"dim"`` or ``"median"``.
        bandwidth: sigma for the ``fixed`` and ``dim`` rules.
        scales: factors multiplying c; the kernels at each are summed.
    """

    name: str = "rbf"
    rule: str = "dim"
    bandwidth: float = 1.0
    scales: Sequence[float] = (1.0,)

    def __post_init__(self) -> None:
        if self.name not in KERNELS:
            raise ValueError(f"unknown kernel {self.name!r}; choose one of {KERNELS}")
        if self.rule not in BANDWIDTH_RULES:
            raise ValueError(
                f"unknown bandwidth rule {self.rule!r}; choose one of {BANDWIDTH_RULES}"
            )
        values = [self.bandwidth, *self.scales]
        if not all(0 < v < math.inf for v in values):
            raise ValueError(
                f"kernel bandwidth and scales must be positive and finite, got "
                f"bandwidth={self.bandwidth}, scales={tuple(self.scales)}"
            )

    def scale(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c for samples x ``(..., n, d)``, y ``(..., m, d)``; shape ``(..., 1, 1)``."""
        d = x.shape[-1]
        if self.rule == "fixed":
            c = torch.as_tensor(2 * self.bandwidth**2)
        elif self.rule == "dim":
            c = torch.as_tensor(2 * d * self.bandwidth**2)  # d is a tensor in a trace
        else:
            pooled = torch.cat([x, y], dim=-2).detach()
            r = torch.cdist(pooled, pooled).square()
            off_diagonal = ~torch.eye(r.shape[-1], dtype=torch.bool, device=r.device)
            c = r[..., off_diagonal].median(dim=-1).values.clamp_min(1e-12)
            return c[..., None, None]
        return c.to(x)

    def gram(self, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """k(x_i, y_j) for x ``(..., n, d)``, y ``(..., m, d)``: ``(..., n, m)``."""
        r = _squared_distances(x, y)
        total = torch.zeros_like(r)
        for s in self.scales:
            cs = c * s
            total = total + (
                torch.exp(-r / cs) if self.name == "rbf" else cs / (cs + r)
            )
        return total


def _squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # The expanded form is fast but can go slightly negative; clamp it.
    xx = x.square().sum(-1)[..., :, None]
    yy = y.square().sum(-1)[..., None, :]
    return (xx + yy - 2 * x @ y.transpose(-1, -2)).clamp_min(0)
