r"""Annealed importance sampling of log p(x) for any model and guide, per datum.

For each datum x, ``chains`` AIS chains (:mod:`.annealing`) run on the path

.. math::
    \pi_\beta(z) \propto q(z \mid x)^{1-\beta}\, p(x, z)^{\beta}
    \quad (\texttt{start="guide"}), \qquad
    \pi_\beta(z) \propto p(z)\, p(x \mid z)^{\beta} \quad (\texttt{start="prior"}),

from the normalized start (β = 0) to p(z | x) (β = 1), so that each chain's weight
has :math:`E[w_c] = p(x)`. The estimate is

.. math::
    \log \hat p_{AIS}(x) = \log \frac1C \sum_{c=1}^C w_c,

a stochastic lower bound of log p(x) (Jensen), with the delta-method standard error
sd(w) / (sqrt(C) mean(w)) over the chains (as in :mod:`.marginal`). With
``steps=1`` there is no transition: it is importance sampling with C draws from q.

**Any model and guide.** log p(x, z) comes from replaying the Pyro model with its
latent sites conditioned on z, and log q(z | x) from the guide's trace conditioned
the same way, as :func:`~pyro_vae.evaluate.weights.log_weights` does; nothing needs
the networks. Every latent site must be continuous and inside
``pyro.plate("data")``; several latent sites are concatenated into one state
``(chains, N, d)``, and a site with a constrained support moves in unconstrained
space (``biject_to``), the log-Jacobian added to both densities. The networks run in
eval mode, with no parameter gradients: the HMC gradient is autograd's in z only.

**Step sizes** per chain and datum are tuned in a pilot pass with its own draws and
frozen for the estimating pass; see :mod:`.annealing` for why adapting inside the
estimating pass would bias p̂(x).

**Randomness.** A datum's draws depend only on ``seed`` and its index: its starting
points come from the guide (or prior) run on that datum alone after
``torch.manual_seed(chunk_seed(seed, index))`` (the estimating pass's are the very
draws of ``log_marginal(..., k=chains, data_chunk=1, seed=seed)``, so AIS and IS
run with the same seed may share starting draws: their errors are then positively
correlated, not independent), and its momenta and accept draws are counter-based.
On the CPU, results are therefore the same whatever the data chunk and on any number
of processes. On a GPU the same holds in distribution; a different batch shape can
change the last bits of a density, and so, rarely, an accept decision.

**Memory.** Data are taken ``data_chunk`` at a time, planned from a memory budget:
one datum costs about ``chains · D · 4 · ACTIVATION_FACTOR · 2`` bytes of network
activations with their gradients. Log-weights accumulate in float64.

References:
    Neal (2001), Annealed importance sampling, Statistics and Computing 11.
    Wu, Burda, Salakhutdinov & Grosse (2017), On the quantitative analysis of
    decoder-based generative models, ICLR.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.infer.util import is_validation_enabled
from torch import nn
from torch.distributions.transforms import ComposeTransform, IndependentTransform

from pyro_vae.errors import ConfigError, DataError
from pyro_vae.evaluate.annealing import (
    Noise,
    Point,
    StepSizes,
    anneal,
    betas,
    pilot_step_sizes,
)
from pyro_vae.evaluate.marginal import ACTIVATION_FACTOR, chunk_seed, default_budget
from pyro_vae.evaluate.weights import SiteContractError, _sample_sites
from pyro_vae.rng import datum_keys, forked_rng

__all__ = [
    "AISResult",
    "ais_log_marginal",
    "ais_settings_check",
    "log_mean_exp_se",
    "plan_data_chunk",
]

STARTS = ("guide", "prior")
MAX_STEPS = 1_000_000  # the counters of annealing.Noise keep steps below this
PILOT, ESTIMATE, REVERSE = 1, 2, 3  # the counter streams of the passes


@dataclass(frozen=True)
class AISResult:
    """Per-datum results of :func:`ais_log_marginal`, float64 on the CPU.

    ``log_weights`` is ``(chains, N)``; ``step_sizes`` ``(bins, chains, N)``, the
    frozen ε along the schedule; ``acceptance`` the mean acceptance probability of
    the estimating pass, per datum.
    """

    steps: int
    chains: int
    leapfrog: int
    schedule: str
    start: str
    pilot_steps: int
    log_px: torch.Tensor
    log_px_se: torch.Tensor
    log_weights: torch.Tensor
    acceptance: torch.Tensor
    step_sizes: torch.Tensor
    seconds: float = 0.0
    chunks: dict[str, int] = field(default_factory=dict)

    def settings(self) -> dict:
        """The settings that produced these numbers."""
        return {
            "steps": self.steps,
            "chains": self.chains,
            "leapfrog": self.leapfrog,
            "schedule": self.schedule,
            "start": self.start,
            "pilot_steps": self.pilot_steps,
        }

    def summary(self) -> dict:
        """Means over data with Monte Carlo standard errors, nats per datum."""
        n = len(self.log_px)
        final = self.step_sizes[-1]
        return {
            **self.settings(),
            "n": n,
            "log_px": {
                "mean": self.log_px.mean().item(),
                "se": self.log_px_se.square().sum().sqrt().item() / n,
            },
            "acceptance": {
                "mean": self.acceptance.mean().item(),
                "min": self.acceptance.min().item(),
            },
            "step_size_at_beta_1": {
                "median": final.median().item(),
                "min": final.min().item(),
                "max": final.max().item(),
            },
            "seconds": self.seconds,
        }


def log_mean_exp_se(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log mean_c w_c over dim 0 and its delta-method se, sd(w)/(sqrt(C) mean(w))."""
    c = log_w.shape[0]
    estimate = torch.logsumexp(log_w, 0) - math.log(c)
    w = torch.exp(log_w - log_w.max(0).values)
    se = w.std(0) / (math.sqrt(c) * w.mean(0)) if c > 1 else torch.zeros_like(estimate)
    return estimate, se


def ais_log_marginal(
    model: Callable,
    guide: Callable | None,
    data: torch.Tensor,
    *,
    steps: int = 1000,
    chains: int = 16,
    leapfrog: int = 10,
    schedule: str = "sigmoid",
    start: str = "guide",
    pilot_steps: int | None = None,
    step_size: float = 0.05,
    target_accept: float = 0.65,
    data_chunk: int | None = None,
    memory_budget: int | None = None,
    seed: int | None = None,
    index_offset: int = 0,
) -> AISResult:
    """Estimate log p(x) for every row of ``data`` by AIS with HMC transitions.

    Args:
        model, guide: Pyro programs keeping the site contract of
            :mod:`pyro_vae.models.vae`; ``guide`` may be None with ``start="prior"``.
        data: ``(N, D)`` on the device the model lives on.
        steps: T, the number of intermediate distributions (1: plain IS).
        chains: C, AIS chains per datum.
        leapfrog: leapfrog steps per HMC transition.
        schedule: ``"sigmoid"`` (Wu et al., 2017) or ``"linear"`` in β.
        start: ``"guide"`` (q(z|x)) or ``"prior"`` (p(z)) as the β = 0 end.
        pilot_steps: steps of the step-size pilot; by default ``min(steps, 200)``.
        step_size: the pilot's initial ε.
        target_accept: the acceptance probability the pilot aims at.
        data_chunk: data per pass; by default planned from ``memory_budget``.
        memory_budget: bytes for one pass; by default half the free GPU memory, or
            1 GiB on CPU.
        seed: the seed of every draw; None draws one from torch's generator.
        index_offset: the global index of ``data[0]`` (a shard of a larger set), so
            that a datum's draws are those it would get in the whole set.

    Returns:
        An :class:`AISResult`.
    """
    ais_settings_check(chains, leapfrog, start, guide, target_accept, steps)
    _check_data(data)
    betas(1, schedule)  # an unknown schedule is refused before any work
    pilot_steps = min(steps, 200) if pilot_steps is None else int(pilot_steps)
    if pilot_steps < 1:
        raise ConfigError(f"pilot_steps must be >= 1, got {pilot_steps}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    begin = time.perf_counter()
    n_chunk = data_chunk or plan_data_chunk(chains, data, memory_budget)
    target = _Target(model, guide, start)
    target.validate(data)
    parts = []
    with _eval_mode(model, guide), pyro.validation_enabled(False):
        for first in range(0, len(data), n_chunk):
            x = data[first : first + n_chunk]
            index = torch.arange(len(x), device=data.device) + index_offset + first
            parts.append(
                _chunk(
                    target, x, index, seed, steps, chains, leapfrog, schedule,
                    pilot_steps, step_size, target_accept,
                )
            )  # fmt: skip
    log_w = torch.cat([p[0] for p in parts], dim=1)
    log_px, se = log_mean_exp_se(log_w)
    return AISResult(
        steps=steps,
        chains=chains,
        leapfrog=leapfrog,
        schedule=schedule,
        start=start,
        pilot_steps=pilot_steps if steps > 1 else 0,
        log_px=log_px,
        log_px_se=se,
        log_weights=log_w,
        acceptance=torch.cat([p[1] for p in parts]),
        step_sizes=torch.cat([p[2] for p in parts], dim=2),
        seconds=time.perf_counter() - begin,
        chunks={"data": n_chunk},
    )


def plan_data_chunk(
    chains: int, data: torch.Tensor, memory_budget: int | None = None
) -> int:
    """Data per pass so that one pass's activations and gradients fit the budget."""
    budget = memory_budget or default_budget(data.device)
    per_datum = chains * data.shape[1] * data.element_size() * ACTIVATION_FACTOR * 2
    return max(1, min(len(data), budget // max(1, per_datum)))


def _chunk(
    target: _Target,
    x: torch.Tensor,
    index: torch.Tensor,
    seed: int,
    steps: int,
    chains: int,
    leapfrog: int,
    schedule: str,
    pilot_steps: int,
    step_size: float,
    target_accept: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-weights (C, n), acceptance (n,), step sizes (bins, C, n)) of a chunk."""
    keys = datum_keys(seed, index)
    densities = target.densities(x, chains)
    if steps > 1:
        bins = max(1, min(50, pilot_steps // 4))
        u_pilot = target.initial(x, chains, seed, index, stream=PILOT)
        sizes = pilot_step_sizes(
            densities,
            u_pilot,
            betas(pilot_steps, schedule),
            leapfrog,
            Noise(keys, PILOT),
            initial=step_size,
            target_accept=target_accept,
            bins=bins,
        )
    else:  # no transition, no step size
        sizes = StepSizes(torch.full((1, chains, len(x)), math.nan).to(x))
    u0 = target.initial(x, chains, seed, index, stream=ESTIMATE)
    run = anneal(
        densities, u0, betas(steps, schedule), sizes, leapfrog, Noise(keys, ESTIMATE)
    )
    return run.log_weights.cpu(), run.acceptance.cpu(), sizes.values()


class _Target:
    """The Pyro side: the latent layout and log b, log t from traces."""

    def __init__(self, model: Callable, guide: Callable | None, start: str) -> None:
        self.model, self.guide, self.start = model, guide, start
        self.layout: _Layout | None = None

    def _proposal(self) -> Callable:
        return self.guide if self.start == "guide" else self.model

    def validate(self, data: torch.Tensor) -> None:
        """Learn the latent layout, and run Pyro's checks once on two data."""
        x = data[:2]
        with forked_rng(data), torch.no_grad(), _eval_mode(self.model, self.guide):
            with pyro.plate("particles", 2, dim=-2):
                trace = poutine.trace(self._proposal()).get_trace(x)
            self.layout = _Layout.of(trace, self.start, len(x))
            if is_validation_enabled():
                self.densities(x, 2)(self.layout.flatten(trace, 2, len(x)))

    @torch.no_grad()
    def initial(
        self, x: torch.Tensor, chains: int, seed: int, index: torch.Tensor, stream: int
    ) -> torch.Tensor:
        """Starting states ``(chains, n, d)``: each datum's own seeded draws."""
        out = []
        with forked_rng(x):
            for row, i in enumerate(index.tolist()):
                torch.manual_seed(chunk_seed(seed, i) if stream == ESTIMATE
                                  else chunk_seed(seed + 7919 * stream, i))  # fmt: skip
                with pyro.plate("particles", chains, dim=-2):
                    trace = poutine.trace(self._proposal()).get_trace(x[row : row + 1])
                out.append(self.layout.flatten(trace, chains, 1))
        return torch.cat(out, dim=1)

    def densities(
        self, x: torch.Tensor, chains: int
    ) -> Callable[[torch.Tensor], Point]:
        layout, model, guide, start = self.layout, self.model, self.guide, self.start
        shape = (chains, len(x))

        def at(u: torch.Tensor) -> Point:
            with torch.enable_grad():
                u = u.detach().requires_grad_(True)
                values, log_det = layout.constrain(u)
                with pyro.plate("particles", chains, dim=-2):
                    model_trace = poutine.trace(
                        poutine.condition(model, data=values)
                    ).get_trace(x)
                    prior, lik = _split_log_prob(model_trace, values, shape)
                    if start == "guide":
                        guide_trace = poutine.trace(
                            poutine.condition(guide, data=values)
                        ).get_trace(x)
                        base = _sum_sites(guide_trace, shape, "guide") + log_det
                    else:
                        base = prior + log_det
                target = prior + lik + log_det
                (g_base,) = torch.autograd.grad(base.sum(), u, retain_graph=True)
                (g_target,) = torch.autograd.grad(target.sum(), u)
            return Point(u.detach(), base.detach(), target.detach(), g_base, g_target)

        return at


@dataclass(frozen=True)
class _Layout:
    """Where each latent site's values sit in the flat state ``(chains, N, d)``."""

    names: tuple[str, ...]
    free_shapes: tuple[torch.Size, ...]  # each site's unconstrained event shape
    transforms: tuple[object | None, ...]

    @staticmethod
    def of(trace: poutine.Trace, start: str, n: int) -> _Layout:
        who = "guide" if start == "guide" else "model"
        names, shapes, transforms = [], [], []
        for name, site in _sample_sites(trace):
            if site["is_observed"]:
                continue
            fn = site["fn"]
            if fn.support.is_discrete or site["infer"].get("enumerate"):
                raise SiteContractError(
                    f"the {who}'s latent site {name!r} is discrete; AIS moves "
                    "continuous latents by HMC. Sum a discrete latent out in the "
                    "model, or estimate log p(x) by importance sampling (--method is)"
                )
            batch = site["value"].shape[: site["value"].dim() - fn.event_dim]
            if tuple(batch) != (2, n):
                raise SiteContractError(
                    f"the {who}'s latent site {name!r} has batch shape "
                    f"{tuple(batch)}, not (particles, data) = (2, {n}): every latent "
                    "must sit inside pyro.plate('data') with its features in "
                    ".to_event(1); a latent outside the data plate couples the data"
                )
            t = biject_to(fn.support)
            names.append(name)
            free = site["value"] if _is_identity(t) else t.inv(site["value"])
            shapes.append(free.shape[2:])  # a simplex of K lives in K - 1 numbers
            transforms.append(None if _is_identity(t) else t)
        if not names:
            raise SiteContractError(f"the {who} has no latent sample site")
        return _Layout(tuple(names), tuple(shapes), tuple(transforms))

    def flatten(self, trace: poutine.Trace, chains: int, n: int) -> torch.Tensor:
        parts = []
        for name, t in zip(self.names, self.transforms, strict=True):
            value = trace.nodes[name]["value"].detach()
            value = value if t is None else t.inv(value)
            parts.append(value.reshape(chains, n, -1))
        return torch.cat(parts, dim=-1)

    def flatten_values(self, values: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """Latent values ``(n, *event)`` per site as one state ``(1, n, d)``."""
        parts = []
        for name, t in zip(self.names, self.transforms, strict=True):
            value = values[name].detach()
            value = value if t is None else t.inv(value)
            parts.append(value.reshape(1, n, -1))
        return torch.cat(parts, dim=-1)

    def constrain(
        self, u: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        values, log_det, at = {}, u.new_zeros(u.shape[:-1]), 0
        for name, shape, t in zip(
            self.names, self.free_shapes, self.transforms, strict=True
        ):
            size = math.prod(shape)
            piece = u[..., at : at + size].reshape(*u.shape[:-1], *shape)
            at += size
            if t is not None:
                value = t(piece)
                ladj = t.log_abs_det_jacobian(piece, value)
                log_det = log_det + ladj.reshape(*u.shape[:-1], -1).sum(-1)
                piece = value
            values[name] = piece
        return values, log_det


def _is_identity(t: object) -> bool:
    """True for biject_to(real) (an empty composition), however independent."""
    while isinstance(t, IndependentTransform):
        t = t.base_transform
    return isinstance(t, ComposeTransform) and not t.parts


def _split_log_prob(
    trace: poutine.Trace, latents: dict, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(z), log p(x | z)) of a model trace conditioned on the latents."""
    trace.compute_log_prob()
    prior, lik = [], []
    for name, site in _sample_sites(trace):
        lp = _checked(site["log_prob"], shape, name, "model")
        (prior if name in latents else lik).append(lp)
    return _total(prior, shape), _total(lik, shape)


def _sum_sites(trace: poutine.Trace, shape: tuple[int, int], who: str) -> torch.Tensor:
    trace.compute_log_prob()
    return _total(
        [_checked(s["log_prob"], shape, n, who) for n, s in _sample_sites(trace)],
        shape,
    )


def _total(terms: list[torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """The sum of log_prob terms ``(chains, N)``, on their device and dtype."""
    if not terms:
        raise SiteContractError("a trace with no sample site to score")
    return sum(terms[1:], terms[0])


def _checked(
    lp: torch.Tensor, shape: tuple[int, int], name: str, who: str
) -> torch.Tensor:
    if lp.shape != shape:
        raise SiteContractError(
            f"the {who}'s site {name!r} has log_prob shape {tuple(lp.shape)}, not "
            f"(chains, data) = {shape}: it is not inside pyro.plate('data'), or its "
            "event_dim is wrong"
        )
    return lp


@contextmanager
def _eval_mode(*programs: object) -> Iterator[None]:
    """Every module of the programs in eval mode, their flags restored after."""
    modules = [m for p in programs if isinstance(p, nn.Module) for m in p.modules()]
    flags = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        yield
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.training = flag


def ais_settings_check(
    chains: object,
    leapfrog: object,
    start: str,
    guide: object,
    target_accept: float,
    steps: object = 1,
) -> None:
    """Refuse impossible AIS settings with a message that names the fix."""
    for name, value in (("steps", steps), ("chains", chains), ("leapfrog", leapfrog)):
        ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
        if not ok or value < 1:
            raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
        if name == "steps" and value >= MAX_STEPS:
            raise ConfigError(f"steps must be below {MAX_STEPS:,}, got {value}")
    if chains < 2:
        raise ConfigError(
            f"chains must be >= 2, got {chains}: one chain per datum gives no Monte "
            "Carlo standard error"
        )
    if start not in STARTS:
        raise ConfigError(f"start must be one of {STARTS}, got {start!r}")
    if start == "guide" and guide is None:
        raise ConfigError('start="guide" needs a guide; pass one, or start="prior"')
    if not 0.0 < target_accept < 1.0:
        raise ConfigError(f"target_accept must be in (0, 1), got {target_accept}")


def _check_data(data: object) -> None:
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or len(data) == 0:
        raise DataError(
            "data must be a non-empty torch.Tensor (N, D), one datum per row; got "
            f"{type(data).__name__} {tuple(getattr(data, 'shape', ()))}; reshape "
            "it, e.g. x.reshape(len(x), -1)"
        )
    if not data.is_floating_point():
        raise DataError(f"data must hold floats, got {data.dtype}; use x.float()")
