r"""Maximum mean discrepancy between two samples, as a differentiable estimate.

For samples X = {x_i}_{i=1}^n ~ P and Y = {y_j}_{j=1}^m ~ Q and a kernel k,

.. math::
    \mathrm{MMD}^2(P, Q) = E k(x, x') + E k(y, y') - 2 E k(x, y).

* ``unbiased=True`` (default): the U-statistic, which drops the diagonal terms,
  (1/(n(n-1))) Σ_{i≠i'} k(x_i, x_i') + (1/(m(m-1))) Σ_{j≠j'} k(y_j, y_j')
  - (2/(nm)) Σ_{i,j} k(x_i, y_j). Its mean is MMD² exactly; it can be negative.
* ``unbiased=False``: the V-statistic, which keeps the diagonals and divides by n²,
  m²: biased upward by O(1/n), never negative.

Batch dimensions to the left of ``(n, d)`` are kept: one estimate per batch entry.

References:
    Gretton, Borgwardt, Rasch, Schölkopf & Smola (2012), A Kernel Two-Sample Test,
    JMLR 13, lemma 6 and eq. (3).
"""

from __future__ import annotations

import torch

from pyro_vae.losses.kernels import Kernel

__all__ = ["mmd2"]


def mmd2(
    x: torch.Tensor, y: torch.Tensor, kernel: Kernel, *, unbiased: bool = True
) -> torch.Tensor:
    """MMD² between samples x ``(..., n, d)`` and y ``(..., m, d)``; shape ``(...)``."""
    n, m = x.shape[-2], y.shape[-2]
    if unbiased and min(n, m) < 2:
        raise ValueError("the unbiased MMD estimate needs at least 2 samples per side")
    c = kernel.scale(x, y)
    kxx, kyy, kxy = kernel.gram(x, x, c), kernel.gram(y, y, c), kernel.gram(x, y, c)
    if unbiased:
        sxx = (kxx.sum((-1, -2)) - kxx.diagonal(dim1=-2, dim2=-1).sum(-1)) / (
            n * (n - 1)
        )
        syy = (kyy.sum((-1, -2)) - kyy.diagonal(dim1=-2, dim2=-1).sum(-1)) / (
            m * (m - 1)
        )
    else:
        sxx, syy = kxx.mean((-1, -2)), kyy.mean((-1, -2))
    return sxx + syy - 2 * kxy.mean((-1, -2))
