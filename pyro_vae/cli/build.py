"""Assemble a (model, guide) pair from a :class:`FitConfig` by the names of its parts.

This is the CLI's assembly step: with :mod:`pyro_vae.cli.fit` and
:mod:`pyro_vae.cli.parts`, the only place that imports both :mod:`pyro_vae.models` and
:mod:`pyro_vae.guides`.
A prior, likelihood or guide is a registry name or a factory of one's own given as
``PACKAGE.MODULE:FACTORY``; :mod:`pyro_vae.cli.parts` says which keywords each factory
gets and what it must return.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch

from pyro_vae.cli.config import FitConfig
from pyro_vae.cli.parts import call_factory
from pyro_vae.errors import ConfigError
from pyro_vae.guides import ENCODERS
from pyro_vae.models import DECODERS, VAE

__all__ = ["build_model_and_guide", "lookup"]


def lookup(registry: Mapping[str, Any], name: str, what: str) -> Any:
    """``registry[name]``, or a :class:`ConfigError` that lists the valid names."""
    try:
        return registry[name]
    except KeyError:
        raise ConfigError(
            f"unknown {what} {name!r}; choose one of: {', '.join(sorted(registry))}"
        ) from None


def build_model_and_guide(
    cfg: FitConfig, data_dim: int, image_shape: Sequence[int] | None = None
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The VAE model p(z) p(x|z) and guide q(z|x) that ``cfg`` names.

    Args:
        cfg: names and options of the parts.
        data_dim: D, the flattened size of a datum.
        image_shape: the datum's shape, for conv networks; ``(D,)`` by default.
    """
    image_shape = tuple(image_shape) if image_shape else (data_dim,)
    try:
        likelihood = call_factory(
            "likelihood",
            cfg.likelihood,
            data_dim=data_dim,
            latent_dim=cfg.latent_dim,
            sigma=cfg.sigma,
            sigma_floor=cfg.sigma_floor,
        )
        make_encoder = partial(
            lookup(ENCODERS, cfg.arch, "architecture"),
            image_shape,
            hidden=cfg.hidden,
            activation=cfg.activation,
        )
        guide = call_factory(
            "guide",
            cfg.guide,
            make_encoder=make_encoder,
            latent_dim=cfg.latent_dim,
            data_dim=data_dim,
            rank=cfg.rank,
            flow_steps=cfg.flow_steps,
            hidden=cfg.hidden,
            activation=cfg.activation,
        )
        prior = call_factory(
            "prior",
            cfg.prior,
            latent_dim=cfg.latent_dim,
            data_dim=data_dim,
            posterior=guide.posterior,
            components=cfg.components,
            pseudo_inputs=cfg.pseudo_inputs,
            df=cfg.df,
        )
        decoder = lookup(DECODERS, cfg.arch, "architecture")(
            cfg.latent_dim,
            image_shape,
            likelihood.params_per_feature,
            cfg.hidden,
            cfg.activation,
        )
    except ConfigError:
        raise
    except ValueError as err:  # a part refused its settings; say so plainly
        raise ConfigError(str(err)) from None
    return VAE(prior, decoder, likelihood), guide
