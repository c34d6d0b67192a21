"""The figures of a run directory, drawn from a trained (model, guide) pair.

``figures/`` gets: ``reconstructions.png`` (test inputs beside E[x|z], z ~ q(z|x)),
``samples.png`` (E[x|z], z ~ p(z)), ``elbo.png`` (train and validation ELBO per
epoch, with the test log p̂(x) when evaluated), ``latent.png`` (E_q[z|x] of test data
coloured by label: PCA when d > 2), ``manifold.png`` (only for d = 2: a grid of prior
quantiles decoded), ``denoising.png`` and ``interpolation.png``. The evaluation adds
``iwae_vs_k.png`` and ``khat.png`` (:mod:`pyro_vae.evaluate.report`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pyro_vae import plots
from pyro_vae.data import Splits
from pyro_vae.generate import (
    decode,
    encode_mean,
    interpolate,
    reconstruct,
    sample_prior,
)
from pyro_vae.train import EpochStats

__all__ = ["MANIFOLD_SIDE", "N_PICTURES", "add_noise", "save_figures"]

N_PICTURES = 32
MANIFOLD_SIDE = 15
FLIP_RATE, NOISE_SD = 0.1, 0.2


def add_noise(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """Noise that keeps data in their support: flip 10% of binary pixels, or add
    N(0, 0.2²) to grey levels, clipped to [0, 1] and rounded to x's own grid."""
    binary = bool(((x == 0) | (x == 1)).all())
    if binary:
        flip = torch.rand(x.shape, generator=generator, device=x.device) < FLIP_RATE
        return torch.where(
            flip, 1 - x, x
        ), f"({100 * FLIP_RATE:.0f}% of pixels flipped)"
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    noisy = x + NOISE_SD * noise
    noisy = noisy.clamp(0, 1)
    if bool(((x * 255).round() == x * 255).all()):  # 8-bit data stay 8-bit
        noisy = (noisy * 255).round() / 255
    return noisy, f"(+ N(0, {NOISE_SD}²) noise)"


def save_figures(
    out: Path,
    model: Callable,
    guide: Callable,
    splits: Splits,
    history: list[EpochStats],
    log_px: tuple[float, float] | None = None,
    seed: int = 0,
) -> list[Path]:
    """Draw every figure of the module docstring into ``out / "figures"``."""
    figures, shape = out / "figures", splits.image_shape
    x = splits.test[:N_PICTURES]
    gen = torch.Generator(device=x.device).manual_seed(seed)
    drawn = [
        plots.plot_reconstructions(
            x, reconstruct(model, guide, x), shape, figures / "reconstructions.png"
        ),
        plots.plot_samples(sample_prior(model, x), shape, figures / "samples.png"),
        plots.plot_elbo(
            [h.epoch for h in history],
            [h.train_elbo for h in history],
            [h.valid_elbo for h in history],
            figures / "elbo.png",
            log_px=log_px,
        ),
        plots.plot_latent_scatter(
            encode_mean(guide, splits.test),
            splits.test_labels,
            figures / "latent.png",
        ),
    ]
    noisy, how = add_noise(x[:16], gen)
    drawn.append(
        plots.plot_denoising(
            x[:16],
            noisy,
            reconstruct(model, guide, noisy),
            shape,
            figures / "denoising.png",
            noise=how,
        )
    )
    pairs = interpolate(model, guide, x[:4], x[4:8], steps=8)
    drawn.append(plots.plot_interpolation(pairs, shape, figures / "interpolation.png"))
    z_dim = encode_mean(guide, x[:1]).shape[-1]
    if z_dim == 2:
        q = torch.linspace(0.05, 0.95, MANIFOLD_SIDE).to(x)
        values = torch.distributions.Normal(0.0, 1.0).icdf(q)
        z1, z2 = torch.meshgrid(values, values.flip(0), indexing="xy")
        grid = torch.stack([z1.flatten(), z2.flatten()], dim=-1)
        drawn.append(
            plots.plot_manifold(
                decode(model, grid, splits.data_dim), shape, figures / "manifold.png"
            )
        )
    return drawn
