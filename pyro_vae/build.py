"""Assemble a (model, guide) pair from a :class:`FitConfig` by registry names.

This is the CLI's assembly step: the only place, with :mod:`pyro_vae.fit`, that
imports both :mod:`pyro_vae.models` and :mod:`pyro_vae.guides`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pyro_vae.config import FitConfig
from pyro_vae.errors import ConfigError
from pyro_vae.guides import GUIDES
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
    cfg: FitConfig, data_dim: int
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The VAE model p(z) p(x|z) and guide q(z|x) that ``cfg`` names."""
    try:
        likelihood = lookup(LIKELIHOODS, cfg.likelihood, "likelihood")(
            sigma=cfg.sigma, sigma_floor=cfg.sigma_floor
        )
        prior = lookup(PRIORS, cfg.prior, "prior")(cfg.latent_dim)
        out_features = data_dim * likelihood.params_per_feature
        decoder = lookup(DECODERS, "mlp", "decoder")(
            cfg.latent_dim, out_features, cfg.hidden, cfg.activation
        )
        guide = lookup(GUIDES, cfg.guide, "guide")(
            data_dim, cfg.latent_dim, cfg.hidden, cfg.activation
        )
    except ConfigError:
        raise
    except ValueError as err:  # a part refused its settings; say so plainly
        raise ConfigError(str(err)) from None
    return VAE(prior, decoder, likelihood), guide
