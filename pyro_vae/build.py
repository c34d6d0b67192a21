"""Assemble a (model, guide) pair from a :class:`FitConfig` by registry names.

This is the CLI's assembly step: the only place, with :mod:`pyro_vae.fit`, that
imports both :mod:`pyro_vae.models` and :mod:`pyro_vae.guides`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch

from pyro_vae.config import FitConfig
from pyro_vae.errors import ConfigError
from pyro_vae.guides import ENCODERS, GUIDES
from pyro_vae.models import DECODERS, LIKELIHOODS, PRIORS, VAE

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
        likelihood = lookup(LIKELIHOODS, cfg.likelihood, "likelihood")(
            data_dim=data_dim, sigma=cfg.sigma, sigma_floor=cfg.sigma_floor
        )
        make_encoder = partial(
            lookup(ENCODERS, cfg.arch, "architecture"),
            image_shape,
            hidden=cfg.hidden,
            activation=cfg.activation,
        )
        guide = lookup(GUIDES, cfg.guide, "guide")(
            make_encoder,
            cfg.latent_dim,
            rank=cfg.rank,
            flow_steps=cfg.flow_steps,
            hidden=cfg.hidden,
            activation=cfg.activation,
        )
        prior = lookup(PRIORS, cfg.prior, "prior")(
            cfg.latent_dim,
            components=cfg.components,
            pseudo_inputs=cfg.pseudo_inputs,
            df=cfg.df,
            data_dim=data_dim,
            posterior=guide.posterior,
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
