r"""What the latent code learned: diagnostics of q(z|x) over a data set.

All from traces of the guide (and of the model, for its prior), so they work for any
pair that keeps the site contract. With z_n ~ q(z | x_n), one per datum:

* ``mmd``: MMD²(q(z), p(z)) between the codes and as many prior draws (U-statistic,
  RBF kernel with c = 2d), on at most ``max_pairs`` data; 0 in expectation when the
  aggregate posterior q(z) = E_x q(z|x) matches the prior. None for a single datum.
* ``log_det_cov``: log det Cov[q(z)], the sample covariance of the codes; 0 for
  N(0, I). Far below 0 means q(z) is squeezed into a thin set (InfoVAE, section 5).
  None when it is not finite, or with no more data than latent dimensions (the
  sample covariance is then singular whatever q(z) is).
* ``active_units``: the number of dimensions with Cov_x(E_q[z_d | x]) > 0.01
  (Burda et al., 2016, section 5.2), using the guide's exact mean where it has one.
  None, with ``unit_variance``, for a single datum.
* ``kl_per_dim``: E_x KL(q(z_d|x) || p(z_d)) for each dimension, when guide and prior
  both factorize over dimensions (``Independent`` of a univariate family with a
  registered KL); otherwise None.
* ``mutual_information``: I(x; z) = E_{x, z~q(z|x)}[log q(z|x) - log q(z)], with q(z)
  replaced by the mixture (1/M) Σ_m q(z | x_m) over the same M data (Hoffman &
  Johnson, 2016). It cannot exceed log M, which is reported beside it.

References:
    Burda, Grosse & Salakhutdinov (2016), arXiv:1509.00519. Hoffman & Johnson (2016),
    ELBO surgery, NIPS workshop on approximate Bayesian inference. Zhao, Song &
    Ermon (2019), InfoVAE, arXiv:1706.02262.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch.distributions import kl_divergence

from pyro_vae.losses.kernels import Kernel
from pyro_vae.losses.mmd import mmd2
from pyro_vae.rng import forked_rng

__all__ = ["ACTIVE_UNIT_THRESHOLD", "latent_diagnostics"]

ACTIVE_UNIT_THRESHOLD = 0.01


@torch.no_grad()
def latent_diagnostics(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *,
    seed: int = 0,
    max_pairs: int = 2000,
    site: str = "z",
) -> dict:
    """The diagnostics of the module docstring on data ``x`` ``(N, D)``.

    Args:
        model, guide: the pair, keeping the site contract.
        x: the data (e.g. the test split), on the model's device.
        seed: seeds the draws (the caller's RNG state is restored).
        max_pairs: M, the data used for the O(M²) statistics (MMD, MI).
        site: the latent site.
    """
    with forked_rng(x):
        torch.manual_seed(seed)
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            x
        )
        q, z = guide_trace.nodes[site]["fn"], guide_trace.nodes[site]["value"]
        prior = model_trace.nodes[site]["fn"]
        z_prior = prior.sample()
        m = min(max_pairs, len(x))
        small = poutine.trace(guide).get_trace(x[:m]).nodes[site]
        q_m, z_m = small["fn"], small["value"]
    d = z.shape[-1]
    kl_dims = _kl_per_dim(q, prior)
    mmd = log_det = active = unit_var = None  # what too few data cannot tell
    if len(x) >= 2:  # a variance, and the unbiased MMD, need two data
        means = _posterior_means(q, guide, x, seed)
        unit_var = means.double().var(dim=0)
        active = int((unit_var > ACTIVE_UNIT_THRESHOLD).sum())
        unit_var = unit_var.tolist()
        mmd = mmd2(z[:m].double(), z_prior[:m].double(), Kernel("rbf", "dim")).item()
    if len(x) > d:  # with n <= d codes the covariance is singular
        cov = torch.cov(z.double().T).reshape(d, d)
        log_det = _finite_or_none(torch.linalg.slogdet(cov).logabsdet.item())
    return {
        "n": len(x),
        "mmd": mmd,
        "log_det_cov": log_det,
        "active_units": active,
        "latent_dim": d,
        "unit_variance": unit_var,
        "kl_per_dim": None if kl_dims is None else kl_dims.tolist(),
        "mutual_information": _mutual_information(q_m, z_m, m),
        "mutual_information_max": math.log(m),
        "pairs": m,
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _posterior_means(
    q: dist.Distribution, guide: Callable, x: torch.Tensor, seed: int
) -> torch.Tensor:
    """E_q[z | x_n] per datum: exact when the family has a mean, else 256 draws."""
    try:
        return q.mean
    except NotImplementedError:
        with forked_rng(x):
            torch.manual_seed(seed + 1)
            with pyro.plate("particles", 256, dim=-2):
                trace = poutine.trace(guide).get_trace(x)
        return trace.nodes["z"]["value"].mean(dim=0)


def _kl_per_dim(q: dist.Distribution, prior: dist.Distribution) -> torch.Tensor | None:
    """E_x KL(q(z_d|x) || p(z_d)) per dimension, or None if they do not factorize."""
    if not (isinstance(q, dist.Independent) and isinstance(prior, dist.Independent)):
        return None
    try:
        kl = kl_divergence(q.base_dist, prior.base_dist)
    except NotImplementedError:
        return None
    return kl.double().reshape(-1, kl.shape[-1]).mean(dim=0)


def _mutual_information(q: dist.Distribution, z: torch.Tensor, m: int) -> float | None:
    """Mixture estimate of I(x; z) from q and codes z of the same m data."""
    rows = []
    try:
        for lo in range(0, m, 100):  # (100, m, d) at a time, not (m, m, d)
            # log q(z_n | x_j) for n in the block and every j: z (b, 1, d), batch (m,)
            rows.append(q.log_prob(z[lo : lo + 100, None, :]).double())
    except (NotImplementedError, RuntimeError, ValueError):
        return None
    log_q = torch.cat(rows)
    log_aggregate = torch.logsumexp(log_q, dim=1) - math.log(m)
    return (log_q.diagonal() - log_aggregate).mean().item()
