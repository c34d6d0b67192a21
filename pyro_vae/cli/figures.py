"""The figures of a run directory, drawn from a trained (model, guide) pair.

``figures/`` gets: ``reconstructions.png`` (test inputs beside E[x|z], z ~ q(z|x)),
``samples.png`` (E[x|z], z ~ p(z)), ``elbo.png`` (train and validation ELBO per
epoch, with the test log p̂(x) when evaluated), ``latent.png`` (E_q[z|x] of test data
coloured by label: PCA when d > 2), ``manifold.png`` (only for d = 2: a grid of prior
quantiles decoded), ``denoising.png`` and ``interpolation.png``. The evaluation adds
``iwae_vs_k.png`` and ``khat.png`` (:mod:`pyro_vae.cli.evaluation`).

Flat data ``(N, D)`` are drawn as squares when D is a square number, else as strips
of D pixels (:func:`pyro_vae.cli.plots.image_grid`). Each figure is drawn on its own:
one that cannot be drawn (interpolation with a single test datum, the principal
components of a latent scatter with fewer than three) or that fails is skipped, any
older copy of it is removed, and a note says why; the others are drawn all the same.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pyro_vae.cli import plots
from pyro_vae.cli.generate import (
    _samples_without_data,
    decode,
    encode_mean,
    interpolate,
    reconstruct,
    sample_prior,
)
from pyro_vae.data import Splits
from pyro_vae.training.loop import EpochStats

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
    notes: list[str] | None = None,
) -> list[Path]:
    """Draw every figure of the module docstring into ``out / "figures"``.

    Returns the figures drawn; ``notes`` (a list) gets one line per figure skipped
    or failed, e.g. ``"interpolation.png not drawn: it needs two test data"``.
    """
    figures, shape = out / "figures", splits.image_shape
    x = splits.test[:N_PICTURES]
    gen = torch.Generator(device=x.device).manual_seed(seed)
    drawn: list[Path] = []
    skipped = [] if notes is None else notes

    def draw(name: str, make: Callable[[Path], Path], needs: str | None = None) -> None:
        """Draw ``figures/NAME.png`` with ``make``, or note why it is not drawn."""
        _draw_one(figures / f"{name}.png", make, needs, drawn, skipped)

    draw(
        "reconstructions",
        lambda p: plots.plot_reconstructions(x, reconstruct(model, guide, x), shape, p),
    )
    draw("samples", lambda p: plots.plot_samples(_prior_means(model, x), shape, p))
    draw(
        "elbo",
        lambda p: _plot_history(history, log_px, p),
        needs=None if history else "no training history (history.csv is empty)",
    )
    z_dim = encode_mean(guide, x[:1]).shape[-1]
    draw(
        "latent",
        lambda p: plots.plot_latent_scatter(
            encode_mean(guide, splits.test), splits.test_labels, p
        ),
        needs=None  # two principal components of d > 2 need three points
        if len(splits.test) >= 3 or z_dim <= 2
        else f"it needs at least 3 test data, the test split has {len(splits.test)}",
    )
    draw("denoising", lambda p: _denoising(model, guide, x[:16], gen, shape, p))
    pairs = min(4, len(x) // 2)
    draw(
        "interpolation",
        lambda p: plots.plot_interpolation(
            interpolate(model, guide, x[:pairs], x[pairs : 2 * pairs], steps=8),
            shape,
            p,
        ),
        needs=None
        if pairs
        else f"it needs two test data, the test split has {len(splits.test)}",
    )
    if z_dim == 2:
        draw("manifold", lambda p: _manifold(model, x, splits.data_dim, shape, p))
    return drawn


def _draw_one(
    path: Path,
    make: Callable[[Path], Path],
    needs: str | None,
    drawn: list[Path],
    skipped: list[str],
) -> None:
    """Draw a figure into ``drawn``, or remove its old copy and note why not."""
    try:
        if needs is not None:
            raise _Skip(needs)
        drawn.append(make(path))
    except _Skip as why:
        path.unlink(missing_ok=True)  # an older run's figure would mislead
        skipped.append(f"{path.name} not drawn: {why}")
    except Exception as err:  # one figure never costs the others, or the run
        path.unlink(missing_ok=True)
        first = (str(err).strip().splitlines() or [""])[0]
        skipped.append(
            f"{path.name} not drawn: it failed ({type(err).__name__}: {first})"
        )


def _plot_history(
    history: list[EpochStats], log_px: tuple[float, float] | None, path: Path
) -> Path:
    """The train and validation ELBO per epoch, with the test log p̂(x) if given."""
    return plots.plot_elbo(
        [h.epoch for h in history],
        [h.train_elbo for h in history],
        [h.valid_elbo for h in history],
        path,
        log_px=log_px,
    )


def _denoising(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    gen: torch.Generator,
    shape: tuple[int, ...],
    path: Path,
) -> Path:
    """``x``, a noisy copy and the reconstruction of the noisy copy."""
    noisy, how = add_noise(x, gen)
    rec = reconstruct(model, guide, noisy)
    return plots.plot_denoising(x, noisy, rec, shape, path, noise=how)


def _manifold(
    model: Callable,
    x: torch.Tensor,
    data_dim: int,
    shape: tuple[int, ...],
    path: Path,
) -> Path:
    """A grid of 2-d prior quantiles, decoded (``x`` gives dtype and device)."""
    q = torch.linspace(0.05, 0.95, MANIFOLD_SIDE).to(x)
    values = torch.distributions.Normal(0.0, 1.0).icdf(q)
    z1, z2 = torch.meshgrid(values, values.flip(0), indexing="xy")
    grid = torch.stack([z1.flatten(), z2.flatten()], dim=-1)
    return plots.plot_manifold(decode(model, grid, data_dim), shape, path)


class _Skip(Exception):
    """A figure that cannot be drawn from these data; its message says why."""


def _prior_means(model: Callable, x: torch.Tensor) -> torch.Tensor:
    """E[x|z] for N_PICTURES draws z ~ p(z), however few test data there are (a
    model that cannot sample without data gets one draw per test datum)."""
    if len(x) < N_PICTURES and _samples_without_data(model):
        return sample_prior(model, N_PICTURES)
    return sample_prior(model, x)
