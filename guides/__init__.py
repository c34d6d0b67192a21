"""The inference side: amortized guides q(z|x) and their encoders.

Installed as ``pyro_vae.guides`` from the repo's top-level ``guides/`` folder. Imports
torch, pyro and :mod:`pyro_vae.nn` only; never :mod:`pyro_vae.models`.

The guide contract: ``guide(x)`` takes a batch ``(N, D)`` and samples the site ``"z"``
(event_dim 1) inside ``pyro.plate("data", N)``; ``guide.posterior(x)`` returns q(z|x)
as a distribution with batch shape ``(N,)`` and event shape ``(d,)`` (the VampPrior
uses it on its pseudo-inputs). Networks are submodules. In code, the contract is
:class:`AmortizedGuide`, from which every guide here derives (it shares ``forward``);
:class:`pyro_vae.nn.HasPosterior` states the ``posterior`` half as a Protocol.

:data:`GUIDES` maps a command-line name to ``factory(make_encoder, latent_dim,
**options)``, where ``make_encoder(out_features)`` builds the encoder network (MLP or
conv, see :data:`ENCODERS`) with the output width the guide asks for. Each factory
names the options it takes and refuses others (:mod:`pyro_vae.cli.parts`). The guides,
and whether torch has a closed-form KL from their q(z|x) to the standard-Normal
prior ``Normal(0, 1).to_event(1)``:

* ``diagonal``: N(mu, diag sigma^2), :mod:`.gaussian`; KL registered.
* ``lowrank``: N(mu, F F^T + diag s^2), F of rank ``rank``, :mod:`.lowrank`; KL only
  against a ``MultivariateNormal`` prior, not ``Independent(Normal)``.
* ``fullrank``: N(mu, L L^T), :mod:`.fullrank`; likewise only against an MVN.
* ``flow``: a diagonal Normal through ``flow_steps`` conditional IAF steps,
  :mod:`.flow`; no closed form (except with 0 steps, the diagonal guide).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from pyro_vae.nn import mlp, registry_entry

from .base import AmortizedGuide
from .encoders import ENCODERS
from .flow import FlowGuide
from .fullrank import FullRankNormalGuide
from .gaussian import DiagonalNormalGuide
from .lowrank import LowRankNormalGuide

__all__ = [
    "ENCODERS",
    "GUIDES",
    "AmortizedGuide",
    "DiagonalNormalGuide",
    "FlowGuide",
    "FullRankNormalGuide",
    "LowRankNormalGuide",
    "mlp_diagonal_guide",
]


def mlp_diagonal_guide(
    data_dim: int, latent_dim: int, hidden: Sequence[int], activation: str = "relu"
) -> nn.Module:
    """A diagonal-Normal guide whose encoder is an MLP ``D -> hidden -> 2d``."""
    encoder = mlp(data_dim, hidden, 2 * latent_dim, activation)
    return DiagonalNormalGuide(encoder, latent_dim)


#: the keywords the builder offers every guide factory (see :mod:`pyro_vae.cli.parts`):
#: ``make_encoder(out_features)`` builds the encoder network of ``--arch``
GUIDE_KEYWORDS = (
    "make_encoder",
    "latent_dim",
    "data_dim",
    "rank",
    "flow_steps",
    "hidden",
    "activation",
)


def _diagonal(make_encoder: Callable[[int], nn.Module], latent_dim: int) -> nn.Module:
    return DiagonalNormalGuide(make_encoder(2 * latent_dim), latent_dim)


def _lowrank(
    make_encoder: Callable[[int], nn.Module], latent_dim: int, rank: int = 2
) -> nn.Module:
    out = LowRankNormalGuide.out_features(latent_dim, rank)
    return LowRankNormalGuide(make_encoder(out), latent_dim, rank)


def _fullrank(make_encoder: Callable[[int], nn.Module], latent_dim: int) -> nn.Module:
    out = FullRankNormalGuide.out_features(latent_dim)
    return FullRankNormalGuide(make_encoder(out), latent_dim)


def _flow(
    make_encoder: Callable[[int], nn.Module], latent_dim: int, flow_steps: int = 2
) -> nn.Module:
    out = 2 * latent_dim + FlowGuide.default_context_dim(latent_dim, flow_steps)
    return FlowGuide(make_encoder(out), latent_dim, flow_steps)


#: name -> factory(make_encoder, latent_dim, ...) returning a guide module. Each
#: factory names the options it takes (``rank`` for lowrank, ``flow_steps`` for
#: flow); the builder passes it those, of :data:`GUIDE_KEYWORDS`.
GUIDES: dict[str, Callable[..., nn.Module]] = {
    name: registry_entry("guide", name, factory, GUIDE_KEYWORDS)
    for name, factory in [
        ("diagonal", _diagonal),
        ("lowrank", _lowrank),
        ("fullrank", _fullrank),
        ("flow", _flow),
    ]
}
