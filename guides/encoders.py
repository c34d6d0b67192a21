"""Encoders: networks from x ``(..., D)`` to a guide's parameters, MLP or conv."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from pyro_vae.nn import ConvEncoder, mlp

__all__ = ["ENCODERS"]

#: name -> factory(image_shape, out_features, hidden, activation)
ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda image_shape, out_features, hidden, activation: mlp(
        math.prod(image_shape), hidden, out_features, activation
    ),
    "conv": lambda image_shape, out_features, hidden, activation: ConvEncoder(
        tuple(image_shape), out_features, activation
    ),
}
