"""Figures of a run, drawn headless with matplotlib's Agg backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = [
    "image_grid",
    "plot_elbo",
    "plot_iwae_vs_k",
    "plot_khat",
    "plot_reconstructions",
    "plot_samples",
]


def image_grid(
    x: torch.Tensor, image_shape: Sequence[int], cols: int = 8
) -> np.ndarray:
    """Tile ``(N, D)`` images into one ``(rows * H, cols * W)`` array in [0, 1]."""
    h, w = image_shape[-2:]
    imgs = x.detach().float().cpu().reshape(len(x), -1, h, w).mean(dim=1).numpy()
    rows = -(-len(imgs) // cols)
    grid = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1))
    for i, img in enumerate(imgs):
        r, c = divmod(i, cols)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = img
    return grid


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_reconstructions(
    x: torch.Tensor, x_rec: torch.Tensor, image_shape: Sequence[int], path: str | Path
) -> Path:
    """Inputs beside their reconstructions (the mean of p(x|z), z ~ q(z|x))."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    for ax, data, title in zip(
        axes, (x, x_rec), ("input x", "reconstruction E[x|z]"), strict=True
    ):
        ax.imshow(image_grid(data, image_shape), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle("Reconstructions, z ~ q(z|x)")
    return _save(fig, path)


def plot_samples(x: torch.Tensor, image_shape: Sequence[int], path: str | Path) -> Path:
    """Means of p(x|z) for draws z ~ p(z)."""
    fig, ax = plt.subplots(figsize=(4.4, 4.4))
    ax.imshow(image_grid(x, image_shape), cmap="gray", vmin=0, vmax=1)
    ax.set_title("Prior samples E[x|z], z ~ p(z)")
    ax.axis("off")
    return _save(fig, path)


def plot_elbo(
    epochs: Sequence[int],
    train_elbo: Sequence[float],
    valid_elbo: Sequence[float],
    path: str | Path,
) -> Path:
    """Train and validation ELBO per epoch, in nats per datum."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, train_elbo, label="train (running mean over the epoch)")
    ax.plot(epochs, valid_elbo, label="validation")
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
    fig, ax = plt.subplots(figsize=(6, 4))
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
    fig, ax = plt.subplots(figsize=(6, 4))
    finite = khat[np.isfinite(khat)]
    ax.hist(finite, bins=40, color="steelblue")
    for value, label in ((0.5, "0.5: slow"), (0.7, "0.7: unreliable")):
        ax.axvline(value, ls="--", c="k")
        ax.text(value, ax.get_ylim()[1] * 0.95, f" {label}", va="top")
    above = float(np.mean(khat > 0.7))
    ax.set_xlabel("Pareto k̂ of the importance weights (per datum)")
    ax.set_ylabel("number of data")
    title = f"PSIS k̂: {100 * above:.1f}% of data above 0.7"
    if len(finite) < len(khat):
        title += f" ({len(khat) - len(finite)} not fitted: too few samples)"
    ax.set_title(title)
    return _save(fig, path)
