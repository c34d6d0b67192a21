r"""Per-datum log-weights of k vectorized particles, for the particle losses.

.. math::
    \log w_{kn} = \log p(x_n, z_{kn}) - \log q(z_{kn} \mid x_n),
    \qquad z_{kn} \sim q(z \mid x_n), \quad k = 1..K

The guide runs inside ``pyro.plate("particles", K, dim=-2)``, to the left of the data
plate, and the model is replayed on its draws (Pyro's importance trace, with its
model/guide checks under validation). Each sample site's ``log_prob`` then has shape
``(K, N)``; their sum is the log-weight, with a graph through z and both programs'
parameters. A site outside ``pyro.plate("data")`` would couple the data, so a
per-datum bound would silently become a whole-batch one (the ``RenyiELBO`` trap,
:mod:`pyro_vae.losses.iwae`): it is refused.

Two rescorings give the pieces of the path-derivative estimators (STL, DReG):

* :func:`path_log_q`: log q(z|x) at the same z (with its graph) under the guide's
  parameters detached, so its gradient reaches the guide only through z;
* :func:`log_p_at_detached_z`: log p(x, z) at z detached, so its gradient reaches
  only the model's parameters.

This is :mod:`pyro_vae.evaluate.weights` for losses (with graphs, and the pieces
above); losses sit below evaluate in the package's layers, so they do not share code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import torch_item
from pyro.poutine.util import site_is_subsample

from pyro_vae.errors import PyroVAEError

__all__ = [
    "ParticleELBO",
    "ParticleTraces",
    "SiteContractError",
    "log_p_at_detached_z",
    "particle_traces",
    "path_log_q",
]

#: the particles plate's dim: left of the model contract's one "data" plate
PARTICLE_DIM = -2


class SiteContractError(PyroVAEError):
    """A model or guide whose sites break the per-datum contract of a loss."""


class ParticleELBO(ELBO):
    """A Pyro ELBO whose K particles are drawn in one vectorized trace
    (:func:`particle_traces`): a subclass writes :meth:`differentiable_loss` only;
    ``loss`` and ``loss_and_grads`` (for ``SVI``) follow from it.
    """

    def __init__(self, num_particles: int = 1) -> None:
        if not (isinstance(num_particles, int) and num_particles >= 1):
            raise ValueError(
                f"{type(self).__name__} needs num_particles >= 1, got {num_particles!r}"
            )
        super().__init__(num_particles=num_particles, max_plate_nesting=1)

    def _get_trace(self, model, guide, args, kwargs):  # noqa: ANN001, ANN202
        """Pyro's hook for one trace pair; unused, as all K particles are drawn at
        once (:func:`particle_traces`)."""
        raise NotImplementedError(
            f"{type(self).__name__} draws its particles in one vectorized trace"
        )

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: object, **kwargs: object
    ) -> torch.Tensor:
        raise NotImplementedError

    def loss(
        self, model: Callable, guide: Callable, *args: object, **kwargs: object
    ) -> float:
        """The loss, a float."""
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(
        self, model: Callable, guide: Callable, *args: object, **kwargs: object
    ) -> float:
        """The loss, with the estimator's gradients accumulated (for ``SVI``)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)


@dataclass(frozen=True)
class ParticleTraces:
    """One vectorized draw of K particles for a batch of N data.

    Attributes:
        log_p: log p(x, z), ``(K, N)``, unscaled.
        log_q: log q(z|x), ``(K, N)``, unscaled.
        scale: the data plate's scale (N_total / N under subsampling, else 1).
        latents: the guide's draws by site name (with their graphs).
        args, kwargs: the programs' arguments.
    """

    log_p: torch.Tensor
    log_q: torch.Tensor
    scale: float
    latents: dict[str, torch.Tensor]
    args: tuple
    kwargs: dict

    @property
    def log_w(self) -> torch.Tensor:
        """log p(x, z) - log q(z|x), ``(K, N)``."""
        return self.log_p - self.log_q


def particle_traces(
    model: Callable, guide: Callable, k: int, args: tuple, kwargs: dict, who: str
) -> ParticleTraces:
    """Run the guide with k vectorized particles and the model on its draws.

    ``who`` names the loss in error messages. Every guide site must be
    reparameterized (the estimators here differentiate through z).
    """
    if k < 1:
        raise ValueError(f"{who} needs num_particles >= 1, got {k}")
    model_trace, guide_trace = get_importance_trace(
        "flat", -PARTICLE_DIM, _particles(model, k), _particles(guide, k), args, kwargs
    )
    latents = {}
    for name, site in _sample_sites(guide_trace):
        if not site["fn"].has_rsample:
            raise SiteContractError(
                f"{who} differentiates through z, but the guide's site {name!r} "
                f"({type(site['fn']).__name__}) has no rsample; use a "
                "reparameterized distribution there"
            )
        latents[name] = site["value"]
    shape = (k, _data_size(model_trace, guide_trace))
    scales: set[float] = set()
    log_p = _sum_log_prob(model_trace, shape, "model", who, scales)
    log_q = _sum_log_prob(guide_trace, shape, "guide", who, scales)
    if len(scales) > 1:
        raise SiteContractError(
            f"{who}: the sites carry different scales {sorted(scales)}; a per-datum "
            "bound needs one data plate scale for every site (drop poutine.scale, "
            "or scale the loss instead)"
        )
    return ParticleTraces(
        log_p, log_q, scales.pop() if scales else 1.0, latents, args, kwargs
    )


def path_log_q(guide: Callable, traces: ParticleTraces, who: str) -> torch.Tensor:
    """log q(z|x) at the drawn z with the guide's parameters detached, ``(K, N)``.

    The guide is run again, conditioned on its own draws, with every parameter of
    the module replaced by its ``detach()`` for the call (as
    :func:`torch.func.functional_call` does; that one refuses to run under
    :func:`torch.jit.trace`, which the fast step uses). The result depends on the
    parameters only through z, and keeps every site's dependence on earlier draws
    (a hierarchical guide keeps that path). Its gradient is the path derivative of
    log q (Roeder et al., 2017).
    """
    _check_detachable(guide, who)
    conditioned = poutine.condition(
        _particles(guide, traces.log_q.shape[0]), traces.latents
    )
    with _detached_parameters(guide):
        trace = poutine.trace(conditioned).get_trace(*traces.args, **traces.kwargs)
    trace.compute_log_prob()
    return _sum_log_prob(trace, tuple(traces.log_q.shape), "guide", who, set())


def log_p_at_detached_z(
    model: Callable, traces: ParticleTraces, who: str
) -> torch.Tensor:
    """log p(x, z) at the drawn z detached, ``(K, N)``: a graph to the model's
    parameters (and to a prior's, also where the prior shares the guide's) only."""
    values = {name: z.detach() for name, z in traces.latents.items()}
    conditioned = poutine.condition(_particles(model, traces.log_p.shape[0]), values)
    trace = poutine.trace(conditioned).get_trace(*traces.args, **traces.kwargs)
    trace.compute_log_prob()
    return _sum_log_prob(trace, tuple(traces.log_p.shape), "model", who, set())


def _check_detachable(guide: Callable, who: str) -> None:
    """Refuse a guide whose parameters cannot be detached for one call."""
    if not isinstance(guide, torch.nn.Module):
        raise TypeError(
            f"{who} re-runs the guide with its parameters detached, which needs the "
            f"guide to be a torch.nn.Module (e.g. a PyroModule) that holds them; got "
            f"{type(guide).__name__}. Wrap the guide in a PyroModule, or use "
            "grad_estimator='reparam'"
        )
    constrained = any(getattr(m, "_pyro_params", None) for m in guide.modules())
    if constrained and not pyro.settings.get("module_local_params"):
        raise ValueError(
            f"{who}: the guide has PyroParams, which Pyro reads from its global "
            "parameter store, so they cannot be detached for one call; call "
            "pyro.settings.set(module_local_params=True) first (pyro_vae's fit does)"
        )


@contextmanager
def _detached_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, every parameter of ``module`` is its ``detach()``."""
    held = [
        (owner, name, p)
        for owner in module.modules()
        for name, p in owner._parameters.items()
        if p is not None
    ]
    try:
        for owner, name, p in held:
            owner._parameters[name] = p.detach()
        yield
    finally:
        for owner, name, p in held:
            owner._parameters[name] = p


def _particles(fn: Callable, k: int) -> Callable:
    """``fn`` inside the particles plate. The plate wraps the program, inside any
    replay or condition, so that it broadcasts every site's distribution to
    ``(K, N)`` before the replayed value is set (as Pyro's vectorized ELBOs do)."""
    return pyro.plate("particles", k, dim=PARTICLE_DIM)(fn)


def _sample_sites(trace: poutine.Trace) -> list[tuple[str, dict]]:
    """Sample sites, without the plates' own subsample sites."""
    return [
        (name, site)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]


def _data_size(model_trace: poutine.Trace, guide_trace: poutine.Trace) -> int:
    """N: the largest rightmost batch size of any site (the data plate's size)."""
    sizes = [
        site["unscaled_log_prob"].shape[-1]
        for trace in (model_trace, guide_trace)
        for _, site in _sample_sites(trace)
        if site["unscaled_log_prob"].dim()
    ]
    return max(sizes, default=1)


def _sum_log_prob(
    trace: poutine.Trace, shape: tuple, program: str, loss: str, scales: set[float]
) -> torch.Tensor:
    """Σ over sample sites of the unscaled log_prob, ``shape``; adds their scales."""
    total = None
    for name, site in _sample_sites(trace):
        lp = site["unscaled_log_prob"]
        if tuple(lp.shape) != shape:
            raise SiteContractError(
                f"{loss}: the {program}'s site {name!r} has log_prob shape "
                f"{tuple(lp.shape)}, not (particles, data) = {shape}: it is not "
                "inside pyro.plate('data'), or its event_dim is wrong. A per-datum "
                "bound needs every sample site in the data plate with .to_event(1) "
                "over its features"
            )
        if site["mask"] is not None:
            raise SiteContractError(
                f"{loss}: the {program}'s site {name!r} is masked (poutine.mask or "
                "obs_mask); a per-datum bound needs every datum's sites whole"
            )
        scales.add(_number(site["scale"], f"{loss}: the {program}'s site {name!r}"))
        total = lp if total is None else total + lp
    if total is None:
        raise SiteContractError(f"{loss}: the {program} has no sample site")
    return total


def _number(scale: float | torch.Tensor, where: str) -> float:
    """A site's scale as a float. Under :func:`torch.jit.trace` a plate's scale is a
    0-d tensor of its sizes; the float is fixed per batch shape, as is each graph."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise SiteContractError(
                f"{where} is scaled per datum (poutine.scale with a tensor of shape "
                f"{tuple(scale.shape)}); a per-datum bound needs one numeric scale"
            )
        return float(scale)
    return float(scale)
