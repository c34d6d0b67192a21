"""Figures of a run, drawn headless.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``), which
needs no GUI and leaves pyplot's backend alone: importing this module in a notebook
does not switch off inline figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from pyro_vae.files import atomic_path

__all__ = [
    "image_grid",
    "picture_shape",
    "plot_denoising",
    "plot_interpolation",
    "plot_latent_scatter",
    "plot_manifold",
    "plot_elbo",
    "plot_iwae_vs_k",
    "plot_khat",
    "plot_reconstructions",
    "plot_samples",
]


def picture_shape(image_shape: Sequence[int]) -> tuple[int, int]:
    """(H, W) to draw a datum of ``image_shape`` in: its own last two sides; for flat
    data ``(D,)`` a square when D is a square number, else a strip ``(1, D)``."""
    if len(image_shape) >= 2:
        return int(image_shape[-2]), int(image_shape[-1])
    d = int(math.prod(image_shape))
    side = math.isqrt(d)
    return (side, side) if side * side == d else (1, d)


def image_grid(
    x: torch.Tensor, image_shape: Sequence[int], cols: int = 8
) -> np.ndarray:
    """Tile ``(N, D)`` images into one ``(rows * H, cols * W)`` array in [0, 1].

    Flat data ``(D,)`` are drawn by :func:`picture_shape`: squares, or strips one
    pixel high stacked without a gutter between rows, like a heat map."""
    h, w = picture_shape(image_shape)
    imgs = x.detach().float().cpu().reshape(len(x), -1, h, w).mean(dim=1).numpy()
    rows = -(-len(imgs) // cols)
    gap = 0 if h == 1 else 1
    grid = np.full((rows * (h + gap) - gap, cols * (w + 1) - 1), 0.5)  # grey gutters
    for i, img in enumerate(imgs):
        r, c = divmod(i, cols)
        grid[r * (h + gap) : r * (h + gap) + h, c * (w + 1) : c * (w + 1) + w] = img
    return grid


def _subplots(*grid: int, figsize: tuple[float, float]) -> tuple[Figure, object]:
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid)


def _show(
    ax: object,
    x: torch.Tensor,
    image_shape: Sequence[int],
    cols: int = 8,
    fixed_cols: bool = False,
) -> None:
    """Draw ``x`` as a grid of pictures. Strips of flat data go one datum per row
    (unless ``fixed_cols``: the columns mean something) and stretch to be seen."""
    if picture_shape(image_shape)[0] == 1:
        grid = image_grid(x, image_shape, cols=cols if fixed_cols else 1)
        ax.imshow(
            grid, cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="none"
        )
    else:
        ax.imshow(image_grid(x, image_shape, cols=cols), cmap="gray", vmin=0, vmax=1)


def _save(fig: Figure, path: str | Path) -> Path:
    """Write the figure atomically: a stop while saving leaves no half-written PNG."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format=path.suffix[1:] or "png")
    return path


def plot_reconstructions(
    x: torch.Tensor, x_rec: torch.Tensor, image_shape: Sequence[int], path: str | Path
) -> Path:
    """Inputs beside their reconstructions (the mean of p(x|z), z ~ q(z|x))."""
    fig, axes = _subplots(1, 2, figsize=(8, 4.4))
    for ax, data, title in zip(
        axes, (x, x_rec), ("input x", "reconstruction E[x|z]"), strict=True
    ):
        _show(ax, data, image_shape)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle("Reconstructions, z ~ q(z|x)")
    return _save(fig, path)


def plot_samples(x: torch.Tensor, image_shape: Sequence[int], path: str | Path) -> Path:
    """Means of p(x|z) for draws z ~ p(z)."""
    fig, ax = _subplots(figsize=(4.4, 4.4))
    _show(ax, x, image_shape)
    ax.set_title("Prior samples E[x|z], z ~ p(z)")
    ax.axis("off")
    return _save(fig, path)


def plot_elbo(
    epochs: Sequence[int],
    train_elbo: Sequence[float],
    valid_elbo: Sequence[float],
    path: str | Path,
    log_px: tuple[float, float] | None = None,
) -> Path:
    """Train and validation ELBO per epoch, in nats per datum.

    ``log_px = (mean, se)`` marks the importance-sampled test log p̂(x) at the last
    epoch, with a ±2 se bar.
    """
    fig, ax = _subplots(figsize=(6, 4))
    ax.plot(epochs, train_elbo, label="train ELBO (running mean over the epoch)")
    ax.plot(epochs, valid_elbo, label="validation ELBO")
    if log_px is not None:
        ax.errorbar(
            [epochs[-1]],
            [log_px[0]],
            yerr=[2 * log_px[1]],
            fmt="k*",
            ms=10,
            capsize=3,
            label="test log p̂(x) ± 2 se (importance sampled)",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats per datum, higher is better)")
    ax.set_title("Training curve")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_iwae_vs_k(summary: dict, path: str | Path) -> Path:
    """Mean IWAE_k (± 2 se) against k, from the ELBO (k = 1) to log p̂(x) (k = K)."""
    ks = sorted(int(k) for k in summary["iwae"])
    means = np.array([summary["iwae"][str(k)]["mean"] for k in ks])
    ses = np.array([summary["iwae"][str(k)]["se"] for k in ks])
    fig, ax = _subplots(figsize=(6, 4))
    ax.errorbar(ks, means, yerr=2 * ses, marker="o", capsize=3, label="IWAE_k ± 2 se")
    ax.axhline(summary["elbo"]["mean"], ls=":", c="gray", label="ELBO (k = 1)")
    ax.axhline(
        summary["log_px"]["mean"], ls="--", c="k", label=f"log p̂(x), K = {ks[-1]}"
    )
    ax.set_xscale("log")
    ax.set_xlabel("k, importance samples per datum")
    ax.set_ylabel("nats per datum (higher is better)")
    ax.set_title(f"IWAE bound against k (n = {summary['n']})")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_khat(khat: np.ndarray, path: str | Path) -> Path:
    """Histogram of per-datum Pareto k̂, with the 0.5 and 0.7 thresholds."""
    fig, ax = _subplots(figsize=(6, 4))
    finite = khat[np.isfinite(khat)]
    ax.hist(finite, bins=40, color="steelblue")
    ax.axvline(0.5, ls=":", c="k", label="k̂ = 0.5: converges slowly above")
    ax.axvline(0.7, ls="--", c="k", label="k̂ = 0.7: unreliable above")
    ax.legend(loc="upper left", fontsize=8)
    above = float(np.mean(khat > 0.7))
    ax.set_xlabel("Pareto k̂ of the importance weights (per datum)")
    ax.set_ylabel("number of data")
    title = f"PSIS k̂: {100 * above:.1f}% of data above 0.7"
    if len(finite) < len(khat):
        title += f" ({len(khat) - len(finite)} not fitted: too few samples)"
    ax.set_title(title)
    return _save(fig, path)


def plot_manifold(
    grid: torch.Tensor, image_shape: Sequence[int], path: str | Path
) -> Path:
    """Decoded means over an n x n grid of prior quantiles of a 2-D latent.

    ``grid`` is ``(n * n, D)``, row-major from the top-left (high z2, low z1).
    """
    n = int(round(len(grid) ** 0.5))
    fig, ax = _subplots(figsize=(6.5, 6.5))
    _show(ax, grid, image_shape, cols=n, fixed_cols=True)
    ax.set_title(
        f"2-D latent manifold: E[x|z] on a {n} x {n} grid of N(0, 1) quantiles"
    )
    ax.set_xlabel("z1: quantiles 0.05 → 0.95")
    ax.set_ylabel("z2: quantiles 0.95 → 0.05")
    ax.set_xticks([]), ax.set_yticks([])
    return _save(fig, path)


def plot_latent_scatter(
    z: torch.Tensor,
    labels: torch.Tensor | None,
    path: str | Path,
    method: str = "pca",
) -> Path:
    """E_q[z|x] of each datum in 2-D, coloured by label: the code itself when d = 2,
    else its first two principal components, or t-SNE (``method="tsne"``)."""
    z = z.detach().double().cpu().numpy()
    if z.shape[1] == 1:  # one dimension: the code against a little vertical jitter
        jitter = np.random.default_rng(0).uniform(-0.4, 0.4, len(z))
        base = labels.cpu().numpy() if labels is not None else np.zeros(len(z))
        xy, axes = np.stack([z[:, 0], base + jitter], 1), ("z", "label (jittered)")
    elif z.shape[1] == 2:
        xy, axes = z, ("z1", "z2")
    elif method == "tsne":
        from sklearn.manifold import TSNE

        xy, axes = (
            TSNE(init="pca", random_state=0).fit_transform(z),
            ("t-SNE 1", "t-SNE 2"),
        )
    elif not np.ptp(z, axis=0).any():  # one point: no component to find
        xy, axes = z[:, :2], ("z1", "z2 (every code is the same point)")
    else:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2).fit(z)
        xy = pca.transform(z)
        share = 100 * pca.explained_variance_ratio_
        axes = (f"PC 1 ({share[0]:.0f}% of variance)", f"PC 2 ({share[1]:.0f}%)")
    fig, ax = _subplots(figsize=(6, 5))
    colours = {} if labels is None else {"c": labels.cpu().numpy(), "cmap": "tab10"}
    points = ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.8, **colours)
    if labels is not None:
        fig.colorbar(points, ax=ax, label="label")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(f"Latent means E_q[z|x] (d = {z.shape[1]}), coloured by label")
    return _save(fig, path)


def plot_denoising(
    x_clean: torch.Tensor,
    x_noisy: torch.Tensor,
    x_rec: torch.Tensor,
    image_shape: Sequence[int],
    path: str | Path,
    noise: str = "",
) -> Path:
    """Clean inputs, their noisy versions, and the reconstructions of the noisy ones."""
    fig, axes = _subplots(1, 3, figsize=(12, 4.4))
    titles = (
        "clean x",
        f"noisy input {noise}".strip(),
        "reconstruction of the noisy x",
    )
    for ax, data, title in zip(axes, (x_clean, x_noisy, x_rec), titles, strict=True):
        _show(ax, data, image_shape, cols=4)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle("Denoising: E[x|z] with z ~ q(z | noisy x)")
    return _save(fig, path)


def plot_interpolation(
    paths: torch.Tensor, image_shape: Sequence[int], path: str | Path
) -> Path:
    """Rows of decoded straight lines in z between two data: ``(rows, steps, D)``."""
    rows, steps, _ = paths.shape
    fig, ax = _subplots(figsize=(1.0 * steps, 1.1 * rows + 0.6))
    _show(ax, paths.reshape(rows * steps, -1), image_shape, cols=steps, fixed_cols=True)
    ax.set_title("Interpolation: E[x|z] along z = (1 - t) E_q[z|x_a] + t E_q[z|x_b]")
    ax.set_xlabel("t: 0 (x_a) → 1 (x_b)")
    ax.set_xticks([]), ax.set_yticks([])
    return _save(fig, path)
