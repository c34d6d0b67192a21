r"""Per-datum importance log-weights from Pyro traces of any model and guide.

.. math::
    \log w_{kn} = \log p(x_n, z_{kn}) - \log q(z_{kn} \mid x_n),
    \qquad z_{kn} \sim q(z \mid x_n)

The guide runs inside a vectorized ``pyro.plate("particles", K)`` to the left of the
data plate, and the model is replayed on the guide's draws. Every sample site's
``log_prob`` then has shape ``(K, N)``; summing them over sites gives the weights
without knowing anything about the networks, so custom priors, flow guides and user
code work alike. The one requirement is the site contract: every sample site lies
inside ``pyro.plate("data", N)``. A global latent would couple the data, and a
per-datum estimate would silently become a whole-batch one (the ``RenyiELBO`` trap);
it is refused with an error instead.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyro_vae.losses.particles import SiteContractError

__all__ = ["SiteContractError", "log_weights"]


@torch.no_grad()
def log_weights(
    model: Callable, guide: Callable, x: torch.Tensor, k: int, *, plate_dim: int = -2
) -> torch.Tensor:
    """Log importance weights log p(x, z) - log q(z|x), shape ``(k, N)``.

    Args:
        model, guide: Pyro programs taking a batch ``x`` of shape ``(N, D)``.
        x: the data.
        k: particles per datum, drawn in one vectorized pass.
        plate_dim: the particle plate's dim; -2 when the data plate is dim -1.

    Returns:
        Float tensor ``(k, N)`` in the model's dtype.
    """
    if k < 1:
        raise ValueError(f"k must be a positive number of particles, got {k}")
    with pyro.plate("particles", k, dim=plate_dim):
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            x
        )
    _check_latents_match(model_trace, guide_trace)
    shape = (k, x.shape[0])
    return _sum_log_prob(model_trace, shape, "model") - _sum_log_prob(
        guide_trace, shape, "guide"
    )


def _sum_log_prob(
    trace: poutine.Trace, shape: tuple[int, int], who: str
) -> torch.Tensor:
    trace.compute_log_prob()
    total = torch.zeros(shape)
    for name, site in _sample_sites(trace):
        lp = site["log_prob"]
        if lp.shape != shape:
            raise SiteContractError(
                f"the {who}'s site {name!r} has log_prob shape {tuple(lp.shape)}, not "
                f"(particles, data) = {shape}: it is not inside pyro.plate('data'), or "
                "its event_dim is wrong. Per-datum weights need every sample site in "
                "the data plate with .to_event(1) over its features."
            )
        total = total.to(lp) + lp
    return total


def _sample_sites(trace: poutine.Trace) -> list[tuple[str, dict]]:
    """Sample sites, without the plates' own subsample sites."""
    return [
        (name, site)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]


def _check_latents_match(
    model_trace: poutine.Trace, guide_trace: poutine.Trace
) -> None:
    latent = {
        name for name, site in _sample_sites(model_trace) if not site["is_observed"]
    }
    proposed = {name for name, _ in _sample_sites(guide_trace)}
    if latent - proposed:
        raise SiteContractError(
            f"the model's latent sites {sorted(latent - proposed)} have no guide "
            "site; the guide must propose every latent of the model"
        )
