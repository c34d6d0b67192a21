"""Plain torch network builders shared by models and guides.

This is the one module that ``pyro_vae.models`` and ``pyro_vae.guides`` both import, so
it depends on torch alone. Networks work on flattened inputs of any width: 64 for
scikit-learn's digits, 784 for MNIST.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "mlp", "parse_hidden", "softplus_floor"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}


def mlp(
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    activation: str = "relu",
) -> nn.Sequential:
    """Build ``Linear -> act -> ... -> Linear`` with no activation after the last layer.

    Args:
        in_features: width of the input, e.g. 784 for a flattened 28x28 image.
        hidden: widths of the hidden layers, e.g. ``(400,)`` or ``(200, 200)``.
        out_features: width of the output.
        activation: a key of :data:`ACTIVATIONS`.

    Returns:
        A module mapping ``(..., in_features)`` to ``(..., out_features)``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}"
        )
    widths = [in_features, *hidden]
    if min(widths + [out_features]) < 1:
        raise ValueError(
            f"layer widths must be positive, got {widths + [out_features]}"
        )
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(w_in, w_out), ACTIVATIONS[activation]()]
    layers.append(nn.Linear(widths[-1], out_features))
    return nn.Sequential(*layers)


def parse_hidden(text: str) -> tuple[int, ...]:
    """Parse ``"400"`` or ``"200,200"`` into widths; ``""`` means no hidden layer."""
    text = text.strip()
    if not text:
        return ()
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"--hidden takes comma-separated positive integers such as 400 or "
            f"200,200; got {text!r}"
        ) from None
    if any(w < 1 for w in widths):
        raise ValueError(f"--hidden widths must be positive integers; got {text!r}")
    return widths


def softplus_floor(raw: torch.Tensor, floor: float) -> torch.Tensor:
    """``softplus(raw) + floor``: a positive scale that never collapses to zero."""
    return nn.functional.softplus(raw) + floor
