r"""Importance-sampled log p(x) per datum, with its Monte Carlo error and IWAE bounds.

For each datum x, with K draws z_k ~ q(z|x) and weights w_k = p(x, z_k) / q(z_k|x),

.. math::
    \log \hat p(x) = \log \frac1K \sum_{k=1}^K w_k,

an estimator that is consistent as K grows and, by Jensen, biased low for finite K
(Burda et al., 2016). What is returned, per datum, all from the same K weights:

* ``log_px``: log p̂(x), with the **delta-method** standard error
  se = sd(w) / (sqrt(K) mean(w)), computed stably from the log-weights. It is
  trustworthy only when the weights have finite variance, which k̂ checks.
* ``iwae[k]``: the IWAE_k bound E log (1/k) Σ_{j≤k} w_j for k in 1, 10, 100, ..., K,
  estimated **unbiasedly from disjoint groups**: the first k·⌊K/k⌋ weights are split
  into ⌊K/k⌋ groups of k, and the group log-mean-exps are averaged; the standard
  error is their sd over sqrt(number of groups). When every k divides the next the
  groups nest, so the estimates rise with k by Jensen's inequality.
* ``elbo``: the k = 1 mean of log w, the Monte Carlo ELBO, with se sd(log w)/sqrt(K).
* ``khat`` and ``ess``: PSIS diagnostics (:mod:`pyro_vae.evaluate.psis`).
* ``gap``: log p̂(x) - ELBO, which estimates E_q KL(q(z|x) || p(z|x)) + O(1/K), with
  the **paired** delta-method standard error ``gap_se`` below.

**The gap's standard error.** log p̂(x) and the ELBO are two functions of the same K
weights, so their errors are correlated (strongly: both rise with the large log-
weights), and sqrt(se(log p̂)² + se(ELBO)²), which treats them as independent,
overstates the gap's error (twice over for log w ~ N(0, 1), K = 1000: 0.052
against a true 0.027). With w_k = exp(lw_k), the gap is a smooth function of the
joint sample mean of the pairs (w_k, lw_k),

.. math::
    g = f(\bar w, \bar\ell) = \log \bar w - \bar\ell, \qquad
    \nabla f(\mu_w, \mu_\ell) = (1/\mu_w, \; -1),

and the delta method on that joint mean (first-order Taylor expansion at the means,
the covariance of the mean being Σ/K) gives

.. math::
    \operatorname{Var}(g) \approx \frac1K \nabla f^\top \Sigma \nabla f
    = \frac1K \operatorname{Var}\Big(\frac{w}{\mu_w} - \ell\Big)
    = \frac1K \Big(\frac{\operatorname{Var} w}{\mu_w^2}
      - \frac{2 \operatorname{Cov}(w, \ell)}{\mu_w} + \operatorname{Var} \ell\Big),

so per datum ``gap_se = sd_k(w_k / mean(w) - lw_k) / sqrt(K)``, with μ_w estimated
by mean(w). It is computed from the log-weights, w_k / mean(w) = exp(lw_k -
logmeanexp(lw)), which never overflows, and as the sample sd of these K values
(two passes over the weights buffer, which holds all K), not as the difference of
the three moments above, which cancel when the weights are nearly equal. For
log w ~ N(0, 1) it is sqrt((e - 1) - 2 + 1) / sqrt(K) = 0.027 at K = 1000. Like
log p̂'s own se, it needs the weights to have finite variance (k̂ < 0.5).

**Memory and chunks.** Data are taken ``data_chunk`` at a time. For each data chunk
the K weights stream in particle chunks into one float64 buffer ``(K, data_chunk)``;
the log-mean-exps are computed in float64 from it. Memory is therefore about
8·K·data_chunk bytes for the buffer plus one particle chunk's network activations,
which :func:`plan_particle_chunk` sizes from a memory budget.

**Randomness.** With ``seed`` set, the torch RNG is reseeded at the start of each data
chunk from (seed, global index of its first datum), inside ``torch.random.fork_rng``
so the caller's RNG state is untouched. A datum's draws then depend only on the seed
and its data chunk, not on the particle chunk size (on CPU, where torch's normal
sampler fills a stream in order; particle chunks are kept to multiples of 16 for
this). A shard ``data[lo:hi]`` of a larger set, passed with ``index_offset=lo``,
draws what the whole set draws for those data when ``lo`` is a multiple of
``data_chunk``, so sharded runs over several processes equal a one-process run.

References:
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders,
    arXiv:1509.00519. Rubinstein & Kroese (2016), Simulation and the Monte Carlo
    Method, 3rd ed., section 5.7 (the delta method for ratio estimators). Owen
    (2013), Monte Carlo Theory, Methods and Examples, chapter 9 (importance
    sampling; the delta method for a smooth function of a vector of sample means,
    as used there for the self-normalized estimator).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from pyro.infer.util import is_validation_enabled

from pyro_vae.errors import ConfigError, DataError
from pyro_vae.evaluate.psis import KHAT_UNRELIABLE, psis_diagnostics
from pyro_vae.evaluate.weights import log_weights
from pyro_vae.memory import refuse_if_too_big
from pyro_vae.rng import forked_rng

__all__ = ["LogMarginal", "iwae_grid", "log_marginal", "plan_particle_chunk"]

CPU_BUDGET = 1 << 30  # bytes of working memory on CPU when none is given
ACTIVATION_FACTOR = 32  # activations per (particle, datum) per input feature, a guess


@dataclass(frozen=True)
class LogMarginal:
    """Per-datum results of :func:`log_marginal`, float64 ``(N,)`` on the CPU."""

    k: int
    log_px: torch.Tensor
    log_px_se: torch.Tensor
    elbo: torch.Tensor
    elbo_se: torch.Tensor
    gap_se: torch.Tensor
    iwae: dict[int, torch.Tensor]
    iwae_se: dict[int, torch.Tensor]
    khat: torch.Tensor
    ess: torch.Tensor
    seconds: float = 0.0
    chunks: dict[str, int] = field(default_factory=dict)

    @property
    def gap(self) -> torch.Tensor:
        """log p̂(x) - ELBO: the estimate of E_q KL(q(z|x) || p(z|x)), per datum.

        Its standard error is :attr:`gap_se`, paired (see the module docstring).
        """
        return self.log_px - self.elbo

    def summary(self) -> dict:
        """Means over data with Monte Carlo standard errors, in nats per datum."""
        n = len(self.log_px)

        def mean_se(values: torch.Tensor, se: torch.Tensor) -> dict[str, float]:
            return {
                "mean": values.mean().item(),
                "se": se.square().sum().sqrt().item() / n,
            }

        return {
            "k": self.k,
            "n": n,
            "elbo": mean_se(self.elbo, self.elbo_se),
            "log_px": mean_se(self.log_px, self.log_px_se),
            "gap": mean_se(self.gap, self.gap_se),
            "iwae": {
                str(k): mean_se(self.iwae[k], self.iwae_se[k])
                for k in sorted(self.iwae)
            },
            "khat": self._khat_summary(),
            "ess": {"mean": self.ess.mean().item(), "min": self.ess.min().item()},
            "seconds": self.seconds,
        }

    def _khat_summary(self) -> dict[str, float | int | None]:
        """k̂ statistics; mean and max over the data whose tail could be fitted."""
        fitted = self.khat[torch.isfinite(self.khat)]
        return {
            "mean": fitted.mean().item() if len(fitted) else None,
            "max": fitted.max().item() if len(fitted) else None,
            "not_fitted": len(self.khat) - len(fitted),
            "fraction_above_0.5": (self.khat > 0.5).double().mean().item(),
            "fraction_above_0.7": (self.khat > KHAT_UNRELIABLE).double().mean().item(),
        }


def iwae_grid(k: int) -> list[int]:
    """1, 10, 100, ... below K, then K itself."""
    return [10**i for i in range(int(math.log10(k)) + 1) if 10**i < k] + [k]


def plan_particle_chunk(
    k: int,
    n: int,
    data_dim: int,
    budget_bytes: int,
    element_size: int = 4,
    activation_factor: int = ACTIVATION_FACTOR,
) -> int:
    """Particles per pass so that one pass's activations fit ``budget_bytes``.

    One (particle, datum) pair is assumed to cost ``activation_factor * data_dim``
    elements of activations (generous for MLPs; raise it for wide conv nets). The
    float64 weight buffer, 8·k·n bytes, is taken off the budget first. The result is
    a multiple of 16, at least 16, at most k.
    """
    free = budget_bytes - 8 * k * n
    per_particle = max(1, n * data_dim * element_size * activation_factor)
    chunk = max(16, (free // per_particle) // 16 * 16)
    return min(k, chunk)


def default_budget(device: torch.device) -> int:
    """Half the free memory of a CUDA device; :data:`CPU_BUDGET` on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return CPU_BUDGET


def log_marginal(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    k: int = 5000,
    *,
    data_chunk: int = 100,
    particle_chunk: int | None = None,
    memory_budget: int | None = None,
    seed: int | None = None,
    psis: bool = True,
    index_offset: int = 0,
) -> LogMarginal:
    """Estimate log p(x) for every row of ``data`` by importance sampling with q.

    Args:
        model, guide: Pyro programs keeping the site contract of
            :mod:`pyro_vae.models.vae` (any prior, likelihood or guide).
        data: ``(N, D)`` on the device the model lives on.
        k: K, importance samples per datum.
        data_chunk: data per pass.
        particle_chunk: particles per pass; by default planned from the budget.
        memory_budget: bytes for one pass; by default :func:`default_budget`.
        seed: reseed per data chunk (see the module docstring); None uses the
            current RNG stream.
        psis: compute k̂ and ESS (ArviZ); otherwise they are NaN.
        index_offset: the global index of ``data[0]`` (a shard of a larger set): a
            data chunk starting at ``first`` is seeded from ``index_offset + first``,
            so with ``index_offset`` a multiple of ``data_chunk`` the shard's
            results equal those rows of a run over the whole set.

    Returns:
        A :class:`LogMarginal` of float64 per-datum values on the CPU.
    """
    k = _checked_arguments(k, data, data_chunk, particle_chunk)
    start = time.perf_counter()
    n_chunk = min(data_chunk, len(data))
    if particle_chunk is None:
        budget = memory_budget or default_budget(data.device)
        particle_chunk = plan_particle_chunk(
            k, n_chunk, data.shape[1], budget, data.element_size()
        )
    grid, parts = iwae_grid(k), []
    _validate(model, guide, data)
    for first in range(0, len(data), n_chunk):
        x = data[first : first + n_chunk]
        with forked_rng(data, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(chunk_seed(seed, index_offset + first))
            buffer = _weights_buffer(model, guide, x, k, particle_chunk)
        parts.append(_chunk_statistics(buffer, grid, psis))
    chunks = {"data": n_chunk, "particles": particle_chunk}
    return _merged(k, grid, parts, start, chunks)


def _merged(
    k: int, grid: list[int], parts: list[dict], start: float, chunks: dict[str, int]
) -> LogMarginal:
    """One :class:`LogMarginal` from the statistics of every data chunk."""
    merged = {
        key: torch.cat([p[key] for p in parts]) for key in parts[0] if key != "iwae"
    }
    return LogMarginal(
        k=k,
        log_px=merged["log_px"],
        log_px_se=merged["log_px_se"],
        elbo=merged["elbo"],
        elbo_se=merged["elbo_se"],
        gap_se=merged["gap_se"],
        iwae={g: torch.cat([p["iwae"][g][0] for p in parts]) for g in grid},
        iwae_se={g: torch.cat([p["iwae"][g][1] for p in parts]) for g in grid},
        khat=merged["khat"],
        ess=merged["ess"],
        seconds=time.perf_counter() - start,
        chunks=chunks,
    )


def _checked_arguments(
    k: object, data: object, data_chunk: int, particle_chunk: int | None
) -> int:
    """Refuse a bad K, data or chunk size, or a weight buffer too big; K as an int."""
    if not isinstance(k, int | np.integer) or isinstance(k, bool):
        raise ConfigError(
            f"K must be a whole number of importance samples (>= 2), got {k!r} of "
            f"type {type(k).__name__}"
        )
    k = int(k)
    if k < 2:
        raise ConfigError(
            f"K must be a positive number of importance samples, at least 2 (one "
            f"sample gives no Monte Carlo error), got {k}"
        )
    if not isinstance(data, torch.Tensor):
        raise DataError(
            f"data must be a torch.Tensor (N, D), got {type(data).__name__}; convert "
            "it with torch.as_tensor(x, dtype=torch.float32)"
        )
    if data.ndim != 2:
        raise DataError(
            f"data must be (N, D), one datum per row, got shape {tuple(data.shape)}; "
            "reshape it, e.g. x.reshape(len(x), -1), or x[None] for one datum"
        )
    if not data.is_floating_point():
        raise DataError(
            f"data must hold floats, got {data.dtype}; convert with x.float() (and "
            "scale 8-bit data to [0, 1] first)"
        )
    bad_chunk = particle_chunk is not None and particle_chunk < 1
    if len(data) == 0 or data_chunk < 1 or bad_chunk:
        raise ValueError(
            f"need data (got {len(data)} rows) and positive chunk sizes (data_chunk="
            f"{data_chunk}, particle_chunk={particle_chunk})"
        )
    # the float64 (K, data chunk) buffer of log-weights is allocated whole
    refuse_if_too_big(
        8 * k * min(data_chunk, len(data)),
        data.device,
        f"log p(x) with K = {k} (a {k} x {min(data_chunk, len(data))} float64 "
        "buffer of log-weights)",
        "K (--k) or data_chunk",
    )
    return k


def chunk_seed(seed: int, first: int) -> int:
    """A 64-bit seed for the data chunk starting at datum ``first``, distinct for
    every (seed, first) pair (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([abs(seed), int(seed < 0), first]).generate_state(
        1, np.uint64
    )
    return int(state[0])


def _validate(model: Callable, guide: Callable, data: torch.Tensor) -> None:
    """Run Pyro's checks (supports, shapes, sites) once, on two particles of two data.

    The checks cost time on every trace, so the real passes run without them. The
    RNG is forked, so this pass leaves the caller's random stream as it was.
    """
    if not is_validation_enabled():
        return
    with forked_rng(data):
        log_weights(model, guide, data[:2], 2)


def _weights_buffer(
    model: Callable, guide: Callable, x: torch.Tensor, k: int, particle_chunk: int
) -> torch.Tensor:
    """All K log-weights of a data chunk, float64 ``(K, n)``, filled chunk by chunk."""
    buffer = torch.empty(k, len(x), dtype=torch.float64, device=x.device)
    with pyro.validation_enabled(False):
        for lo in range(0, k, particle_chunk):
            hi = min(k, lo + particle_chunk)
            buffer[lo:hi] = log_weights(model, guide, x, hi - lo)
    return buffer


def _chunk_statistics(lw: torch.Tensor, grid: list[int], psis: bool) -> dict:
    """What :class:`LogMarginal` holds, for one data chunk's ``(K, n)`` weights."""
    k = lw.shape[0]
    log_px = torch.logsumexp(lw, dim=0) - math.log(k)
    # The gap's paired delta-method se: sd of w / mean(w) - log w over sqrt(K).
    paired = torch.exp(lw - log_px) - lw
    gap_se = paired.std(dim=0) / math.sqrt(k) if k > 1 else lw[0] * 0
    # Delta method on w / max(w): mean m1, second moment m2, unbiased variance.
    w = torch.exp(lw - lw.max(dim=0).values)
    m1, m2 = w.mean(dim=0), w.square().mean(dim=0)
    var = (m2 - m1.square()).clamp_min(0) * (k / (k - 1) if k > 1 else 0.0)
    log_px_se = (var / k).sqrt() / m1
    iwae = {}
    for g in grid:
        groups = k // g
        values = torch.logsumexp(lw[: groups * g].reshape(groups, g, -1), 1) - math.log(
            g
        )
        se = values.std(dim=0) / math.sqrt(groups) if groups > 1 else log_px_se
        iwae[g] = (values.mean(dim=0).cpu(), se.cpu())
    if psis:
        khat, ess = psis_diagnostics(lw)
    else:
        khat = ess = torch.full((lw.shape[1],), math.nan, dtype=torch.float64)
    return {
        "log_px": log_px.cpu(),
        "log_px_se": log_px_se.cpu(),
        "elbo": lw.mean(dim=0).cpu(),
        "elbo_se": (lw.std(dim=0) / math.sqrt(k) if k > 1 else lw[0] * 0).cpu(),
        "gap_se": gap_se.cpu(),
        "iwae": iwae,
        "khat": khat,
        "ess": ess,
    }
