"""Plain torch network builders shared by models and guides.

This is the one module that ``pyro_vae.models`` and ``pyro_vae.guides`` both import, so
it depends on torch alone. Networks work on flattened inputs of any width: 64 for
scikit-learn's digits, 784 for MNIST.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.distributions import Distribution

__all__ = [
    "ACTIVATIONS",
    "ConvDecoder",
    "ConvEncoder",
    "HasPosterior",
    "PosteriorFn",
    "image_chw",
    "mlp",
    "registry_entry",
    "parse_hidden",
    "softplus_floor",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}


@runtime_checkable
class PosteriorFn(Protocol):
    """A function ``x -> q(z|x)``, as the VampPrior takes it (a guide's ``posterior``).

    Called on a batch ``x`` of shape ``(N, D)``, it returns a distribution with batch
    shape ``(N,)`` and event shape ``(d,)``. Bound methods, functions and modules all
    fit. It lives here, in the one module that models and guides both import, so that
    a prior can state what it needs without importing :mod:`pyro_vae.guides`.
    """

    def __call__(self, x: torch.Tensor, /) -> Distribution: ...


@runtime_checkable
class HasPosterior(Protocol):
    """An amortized guide as far as the rest of pyro_vae needs: ``posterior(x)``.

    ``guide.posterior`` is then a :class:`PosteriorFn`. Every guide in
    :mod:`pyro_vae.guides` derives from ``AmortizedGuide``, which keeps this.
    """

    def posterior(self, x: torch.Tensor) -> Distribution: ...


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


def image_chw(image_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) of a datum shape ``(H, W)`` or ``(C, H, W)``."""
    chw = (1, *image_shape) if len(image_shape) == 2 else tuple(image_shape)
    if len(chw) == 3 and min(chw[1:]) >= 4:
        return chw
    if len(chw) == 3:
        raise ValueError(
            "conv networks need images of at least 4 x 4 pixels, got "
            f"{tuple(image_shape)} (for channels-last arrays (N, H, W, C) use "
            "np.moveaxis(x, -1, 1)); use --arch mlp for small or flat data"
        )
    raise ValueError(
        "conv networks need images of shape (H, W) or (C, H, W), got "
        f"{tuple(image_shape)}; use --arch mlp for flat data"
    )


def _flatten_batch(x: torch.Tensor, event_ndim: int) -> tuple[torch.Tensor, tuple]:
    batch = x.shape[: x.dim() - event_ndim]
    return x.reshape(math.prod(batch), *x.shape[x.dim() - event_ndim :]), batch


class ConvEncoder(nn.Module):
    """x ``(..., C*H*W)`` -> ``(..., out)``: two stride-2 convs, then two linears.

    Spatial sizes follow the image: 28x28 -> 14x14 -> 7x7; 8x8 -> 4x4 -> 2x2.

    Args:
        image_shape: ``(H, W)`` or ``(C, H, W)``.
        out_features: width of the output.
        activation: a key of :data:`ACTIVATIONS`.
        channels: feature maps of the two conv layers.
        width: the hidden linear layer's width.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        out_features: int,
        activation: str = "relu",
        channels: tuple[int, int] = (32, 64),
        width: int = 256,
    ) -> None:
        super().__init__()
        self.chw = image_chw(image_shape)
        act = ACTIVATIONS[activation]
        self.conv = nn.Sequential(
            nn.Conv2d(self.chw[0], channels[0], 4, stride=2, padding=1),
            act(),
            nn.Conv2d(channels[0], channels[1], 4, stride=2, padding=1),
            act(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, *self.chw)).shape[-1]
        self.head = nn.Sequential(
            nn.Linear(flat, width), act(), nn.Linear(width, out_features)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat, batch = _flatten_batch(x, 1)
        out = self.head(self.conv(flat.reshape(-1, *self.chw)))
        return out.reshape(*batch, out.shape[-1])


class ConvDecoder(nn.Module):
    """z ``(..., d)`` -> ``(..., k*C*H*W)``: two linears, two stride-2 transposed convs.

    The maps start at ceil(H/4) x ceil(W/4), are upsampled 4x and cropped to H x W,
    so any image size works. The output holds k blocks of C*H*W (see
    :mod:`pyro_vae.models.decoders`).
    """

    def __init__(
        self,
        latent_dim: int,
        image_shape: Sequence[int],
        params_per_feature: int = 1,
        activation: str = "relu",
        channels: tuple[int, int] = (64, 32),
        width: int = 256,
    ) -> None:
        super().__init__()
        self.chw, self.k = image_chw(image_shape), params_per_feature
        c, h, w = self.chw
        self.start = (channels[0], -(-h // 4), -(-w // 4))
        act = ACTIVATIONS[activation]
        self.head = nn.Sequential(
            nn.Linear(latent_dim, width),
            act(),
            nn.Linear(width, math.prod(self.start)),
            act(),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(channels[0], channels[1], 4, stride=2, padding=1),
            act(),
            nn.ConvTranspose2d(channels[1], self.k * c, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat, batch = _flatten_batch(z, 1)
        maps = self.deconv(self.head(flat).reshape(-1, *self.start))
        c, h, w = self.chw
        maps = maps[..., :h, :w]  # crop the 4x upsampling to the image size
        return maps.reshape(*batch, self.k * c * h * w)


def registry_entry(
    kind: str, name: str, factory: Callable[..., object], keywords: Sequence[str]
) -> Callable[..., object]:
    """``factory`` as the registry entry ``name`` of a part ``kind`` ("prior", ...).

    The entry takes what the factory's signature names. Called directly, it also
    accepts, and drops, the other ``keywords`` the builder offers every part of
    this kind (code that passes a factory all of them keeps working), and refuses
    any other keyword with the list of what it takes. ``inspect.signature`` of the
    entry is the factory's own.
    """
    takes = tuple(inspect.signature(factory).parameters)

    @functools.wraps(factory)
    def entry(*args: object, **options: object) -> object:
        unknown = sorted(set(options) - set(takes) - set(keywords))
        if unknown:
            raise TypeError(
                f"the {name} {kind} does not take {', '.join(unknown)}; it takes: "
                f"{', '.join(takes) or 'no options'}"
            )
        return factory(*args, **{k: v for k, v in options.items() if k in takes})

    return entry
