r"""Annealing with HMC transitions: the model-free half of AIS, in plain torch.

Annealed importance sampling (Neal, 2001) moves a population of chains through
distributions :math:`f_0, \dots, f_T` between a normalized base :math:`f_0` and the
unnormalized target :math:`f_T`, here on the geometric path

.. math::
    \log f_\beta(z) = (1 - \beta) \log b(z) + \beta \log t(z), \qquad
    0 = \beta_0 < \beta_1 < \dots < \beta_T = 1,

and weighs each chain by

.. math::
    \log w = \sum_{t=1}^{T} \log f_{\beta_t}(z_{t-1}) - \log f_{\beta_{t-1}}(z_{t-1})
           = \sum_{t=1}^{T} (\beta_t - \beta_{t-1}) (\log t(z_{t-1}) - \log b(z_{t-1})),

where :math:`z_0 \sim f_0` and :math:`z_t` follows from :math:`z_{t-1}` by a
transition that leaves :math:`f_{\beta_t}` invariant. Then
:math:`E[w] = Z_T / Z_0`. Run backwards, from an exact draw of :math:`f_T` with the
:math:`\beta` reversed, the same loop gives :math:`E[w] = Z_0 / Z_T` (Grosse,
Ghahramani & Adams, 2015): that is the upper half of the BDMC sandwich.

**Transitions.** Hamiltonian Monte Carlo with an identity mass matrix, a full
momentum refresh, ``leapfrog`` leapfrog steps and a Metropolis accept/reject per
chain (Neal, 2011). A trajectory that produces a NaN or infinity is rejected. Every
chain of every datum has its own step size ε, shape ``(chains, N)``.

**Step sizes** come from a *pilot* pass (:func:`pilot_step_sizes`): an annealing run
with its own draws in which, after every transition, log ε moves by
``ADAPT_RATE · (α - target)``, α the Metropolis acceptance probability. The values are
averaged (geometrically) within ``bins`` equal stretches of the schedule and frozen.
The estimating pass reads ε from the bin of its position and never adapts: a step
size tuned on the estimating chains themselves would make ε depend on the state, the
transitions would no longer leave :math:`f_\beta` invariant, and
:math:`E[w] = Z_T/Z_0` would fail.

**Randomness** is counter-based (:mod:`pyro_vae.rng`): a datum's momenta and accept
draws depend on the seed, the datum's index and the draw's counter only.

References:
    Neal (2001), Annealed importance sampling, Statistics and Computing 11.
    Neal (2011), MCMC using Hamiltonian dynamics, Handbook of MCMC, ch. 5.
    Grosse, Ghahramani & Adams (2015), Sandwiching the marginal likelihood using
    bidirectional Monte Carlo, arXiv:1511.02543.
    Wu, Burda, Salakhutdinov & Grosse (2017), On the quantitative analysis of
    decoder-based generative models, ICLR (the sigmoid schedule; AIS for VAEs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pyro_vae.errors import ConfigError
from pyro_vae.rng import counter_normal, counter_uniform

__all__ = [
    "ADAPT_RATE",
    "SCHEDULES",
    "Point",
    "anneal",
    "betas",
    "pilot_step_sizes",
]

ADAPT_RATE = 0.5  # log step size moves by this times (acceptance - target)
SIGMOID_RADIUS = 4.0  # Wu et al. (2017)'s sigmoid schedule spans [-4, 4]


@dataclass(frozen=True)
class Point:
    """The chains' states and the two log-densities there, with their gradients.

    ``u`` is ``(chains, N, d)``; ``base`` and ``target`` are log b and log t,
    ``(chains, N)``; ``g_base`` and ``g_target`` their gradients in u.
    """

    u: torch.Tensor
    base: torch.Tensor
    target: torch.Tensor
    g_base: torch.Tensor
    g_target: torch.Tensor

    def log_f(self, beta: float) -> torch.Tensor:
        """log f_β = log b + β (log t - log b), ``(chains, N)``."""
        return self.base + beta * (self.target - self.base)

    def grad(self, beta: float) -> torch.Tensor:
        """∇ log f_β, ``(chains, N, d)``."""
        return self.g_base + beta * (self.g_target - self.g_base)

    def where(self, mask: torch.Tensor, other: Point) -> Point:
        """This point where ``mask`` ``(chains, N)`` holds, else ``other``."""
        m = mask[..., None]
        return Point(
            torch.where(m, self.u, other.u),
            torch.where(mask, self.base, other.base),
            torch.where(mask, self.target, other.target),
            torch.where(m, self.g_base, other.g_base),
            torch.where(m, self.g_target, other.g_target),
        )


#: u ``(chains, N, d)`` -> the :class:`Point` there.
Densities = Callable[[torch.Tensor], Point]


def _sigmoid(steps: int) -> torch.Tensor:
    s = torch.sigmoid(
        torch.linspace(-SIGMOID_RADIUS, SIGMOID_RADIUS, steps + 1).double()
    )
    return (s - s[0]) / (s[-1] - s[0])


SCHEDULES: dict[str, Callable[[int], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "linear": lambda steps: torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64),
}


def betas(steps: int, schedule: str = "sigmoid") -> torch.Tensor:
    """β_0 = 0 < ... < β_T = 1, float64 ``(steps + 1,)``."""
    if schedule not in SCHEDULES:
        raise ConfigError(
            f"unknown annealing schedule {schedule!r}; "
            f"choose one of {sorted(SCHEDULES)}"
        )
    out = SCHEDULES[schedule](steps)
    out[0], out[-1] = 0.0, 1.0
    return out


@dataclass
class Noise:
    """Counter-based draws for one pass (see :mod:`pyro_vae.rng`)."""

    keys: torch.Tensor
    stream: int

    def _counter(self, t: int, kind: int) -> int:
        """Distinct for every (stream, t < 1,000,003, kind): a 64-bit counter."""
        if not 0 <= t < 1_000_003:
            raise ValueError(f"step {t} is outside the counter range")
        return (self.stream * 1_000_003 + t) * 2 + kind

    def momentum(self, t: int, like: torch.Tensor) -> torch.Tensor:
        return counter_normal(self.keys, self._counter(t, 0), like.shape, like.dtype)

    def uniform(self, t: int, like: torch.Tensor) -> torch.Tensor:
        """float64 uniforms in (0, 1): in float32 the largest round to 1.0."""
        return counter_uniform(
            self.keys, self._counter(t, 1), like.shape, torch.float64
        )


def hmc(
    densities: Densities,
    point: Point,
    beta: float,
    eps: torch.Tensor,
    leapfrog: int,
    momentum: torch.Tensor,
    uniform: torch.Tensor,
) -> tuple[Point, torch.Tensor]:
    """One HMC transition leaving f_β invariant; returns (point, acceptance prob)."""
    e = eps[..., None]
    new, p = point, momentum + 0.5 * e * point.grad(beta)
    for step in range(leapfrog):
        new = densities(new.u + e * p)
        p = p + (e if step < leapfrog - 1 else 0.5 * e) * new.grad(beta)
    h_old = -point.log_f(beta).double() + 0.5 * momentum.double().square().sum(-1)
    h_new = -new.log_f(beta).double() + 0.5 * p.double().square().sum(-1)
    log_alpha = h_old - h_new
    # a NaN or an infinite density at the proposal (+inf would be accepted with
    # alpha = 1 and make the weight infinite) is rejected
    finite = torch.isfinite(log_alpha) & torch.isfinite(h_new)
    finite &= torch.isfinite(new.u).all(-1)
    alpha = torch.where(finite, log_alpha.clamp(max=0.0).exp(), 0.0)
    return new.where(uniform < alpha, point), alpha.to(point.base.dtype)


@dataclass
class Anneal:
    """What :func:`anneal` returns: log-weights ``(chains, N)`` in float64, the mean
    acceptance probability per datum ``(N,)``, and the final point."""

    log_weights: torch.Tensor
    acceptance: torch.Tensor
    point: Point


def anneal(
    densities: Densities,
    u0: torch.Tensor,
    beta: torch.Tensor,
    step_size: Callable[[float], torch.Tensor],
    leapfrog: int,
    noise: Noise,
    adapt: Callable[[float, torch.Tensor], None] | None = None,
    reverse: bool = False,
) -> Anneal:
    """Run the chains from ``u0`` along ``beta`` (ascending; ``reverse`` walks it
    from 1 down to 0) and return their log-weights (module docstring).

    ``step_size(position)`` gives ε ``(chains, N)`` at a position in [0, 1] along
    the forward schedule; ``adapt(position, alpha)``, if given, is told every
    acceptance probability (the pilot pass).
    """
    steps = len(beta) - 1
    order = range(steps, -1, -1) if reverse else range(steps + 1)
    path = [(i, float(beta[i])) for i in order]
    point = densities(u0)
    log_w = torch.zeros(point.base.shape, dtype=torch.float64, device=u0.device)
    accepted = torch.zeros_like(log_w)
    moves = 0
    for t in range(1, steps + 1):
        (_, b_old), (i, b_new) = path[t - 1], path[t]
        log_w += (b_new - b_old) * (point.target.double() - point.base.double())
        if t == steps:
            break
        position = i / steps
        eps = step_size(position)
        m = noise.momentum(t, point.u)
        point, alpha = hmc(
            densities, point, b_new, eps, leapfrog, m, noise.uniform(t, point.base)
        )
        accepted += alpha.double()
        moves += 1
        if adapt is not None:
            adapt(position, alpha)
    acceptance = (accepted / max(moves, 1)).mean(0) if moves else accepted[0] * math.nan
    return Anneal(log_w, acceptance, point)


class StepSizes:
    """Step sizes ``(bins, chains, N)`` frozen from a pilot pass, read by position."""

    def __init__(self, log_eps: torch.Tensor) -> None:
        self.log_eps = log_eps

    @property
    def bins(self) -> int:
        return self.log_eps.shape[0]

    def __call__(self, position: float) -> torch.Tensor:
        index = min(self.bins - 1, int(position * self.bins))
        return self.log_eps[index].exp()

    def values(self) -> torch.Tensor:
        """ε per bin, chain and datum, float64 on the CPU."""
        return self.log_eps.exp().double().cpu()


def pilot_step_sizes(
    densities: Densities,
    u0: torch.Tensor,
    beta: torch.Tensor,
    leapfrog: int,
    noise: Noise,
    *,
    initial: float,
    target_accept: float,
    bins: int,
) -> StepSizes:
    """Tune ε per chain and datum on a pilot annealing pass (module docstring)."""
    shape = u0.shape[:-1]
    log_eps = torch.full(shape, math.log(initial), dtype=u0.dtype, device=u0.device)
    sums = torch.zeros((bins, *shape), dtype=torch.float64, device=u0.device)
    counts = [0] * bins

    def current(position: float) -> torch.Tensor:
        return log_eps.exp()

    def adapt(position: float, alpha: torch.Tensor) -> None:
        index = min(bins - 1, int(position * bins))
        sums[index] += log_eps.double()
        counts[index] += 1
        log_eps.add_(ADAPT_RATE * (alpha - target_accept))

    anneal(densities, u0, beta, current, leapfrog, noise, adapt=adapt)
    frozen = torch.empty_like(sums)
    last = torch.full(shape, math.log(initial), dtype=torch.float64, device=u0.device)
    for index in range(bins):  # an empty bin keeps the value of the one before
        if counts[index]:
            last = sums[index] / counts[index]
        frozen[index] = last
    return StepSizes(frozen.to(u0.dtype))
