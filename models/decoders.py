"""Decoders: networks from z to the likelihood's parameters, MLP or convolutional.

A decoder maps z ``(..., d)`` to ``(..., k * D)`` where D = prod(image_shape) and k is
the likelihood's ``params_per_feature``; any leading batch dims (particles, data) are
kept. The k blocks of D are laid out one after the other, each in the data's own
(C, H, W) order, so a likelihood splits them with ``out.chunk(k, dim=-1)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import nn

from pyro_vae.nn import ConvDecoder, mlp

__all__ = ["DECODERS", "conv_decoder", "mlp_decoder"]


def mlp_decoder(
    latent_dim: int, out_features: int, hidden: Sequence[int], activation: str = "relu"
) -> nn.Module:
    """An MLP decoder from z ``(..., d)`` to likelihood parameters ``(..., out)``."""
    return mlp(latent_dim, hidden, out_features, activation)


def conv_decoder(
    latent_dim: int,
    image_shape: Sequence[int],
    params_per_feature: int,
    hidden: Sequence[int],
    activation: str = "relu",
) -> nn.Module:
    """A transposed-conv decoder to ``params_per_feature`` maps per image channel."""
    return ConvDecoder(latent_dim, tuple(image_shape), params_per_feature, activation)


#: name -> factory(latent_dim, image_shape, params_per_feature, hidden, activation)
DECODERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda latent_dim, image_shape, params_per_feature, hidden, activation: (
        mlp_decoder(
            latent_dim, math.prod(image_shape) * params_per_feature, hidden, activation
        )
    ),
    "conv": conv_decoder,
}
