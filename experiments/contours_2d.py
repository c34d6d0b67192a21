"""Experiment 3: contours of q(z) against p(z), 2-D latent, 500 training images.

With a 2-D latent the aggregate posterior q(z) = (1/n) Σ_i q(z|x_i) over the n
training images is a mixture of n Gaussians whose density can be evaluated exactly on
a grid. The InfoVAE note (Fig. 3 of the paper) shows that with few training images the
ELBO's q(z) strays far from the prior while InfoVAE's stays close. The grid also gives
KL(q(z) || p(z)) by quadrature.

Writes ``contours_2d.png`` and ``contours_2d.json``.

    python experiments/contours_2d.py        # full: Fashion-MNIST, n = 500
    python experiments/contours_2d.py --small
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_model_flags,
    fit_with_flags,
    load,
    save_outputs,
)

from pyro_vae.evaluate.latents import latent_diagnostics  # noqa: E402

LIMIT, POINTS = 4.5, 181


@torch.no_grad()
def aggregate_density(guide, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(1/n) Σ_i N(z; mu_i, diag sigma_i^2) at every grid point, ``(P,)``."""
    loc, scale = (t.double() for t in guide.encode(x))
    z = grid[:, None, :]  # (P, 1, 2) against (n, 2)
    log_q = (
        -0.5 * ((z - loc) / scale).square() - scale.log() - 0.5 * math.log(2 * math.pi)
    ).sum(-1)
    return (torch.logsumexp(log_q, dim=1) - math.log(len(x))).exp()


def run(args: argparse.Namespace) -> dict:
    splits = load(args)
    x_train = splits.train[: args.n]
    axis = torch.linspace(-LIMIT, LIMIT, POINTS, dtype=torch.float64)
    zz1, zz2 = torch.meshgrid(axis, axis, indexing="ij")
    grid = torch.stack([zz1.flatten(), zz2.flatten()], dim=-1)
    prior = torch.exp(-0.5 * grid.square().sum(-1)) / (2 * math.pi)
    cell = (axis[1] - axis[0]).item() ** 2
    gen = torch.Generator().manual_seed(1)
    x_scored = torch.bernoulli(x_train, generator=gen)
    results, densities = {}, {}
    for loss in ("elbo", args.loss):
        model, guide, history = fit_with_flags(
            args, x_train, splits.valid[:1000], loss, latent_dim=2
        )
        q = aggregate_density(guide, x_scored, grid)
        kl = (q * (q.clamp_min(1e-300).log() - prior.log())).sum() * cell
        lat = latent_diagnostics(model, guide, x_scored, seed=args.seed)
        results[loss] = {
            "aggregate_kl_to_prior_nats": kl.item(),
            "mass_on_grid": (q.sum() * cell).item(),
            "log_det_cov": lat["log_det_cov"],
            "mmd": lat["mmd"],
            "valid_elbo": history[-1].valid_elbo,
        }
        densities[loss] = q.reshape(POINTS, POINTS)
        print(loss, results[loss], flush=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    for ax, loss in zip(axes, ("elbo", args.loss), strict=True):
        ax.contour(
            zz1,
            zz2,
            prior.reshape(POINTS, POINTS),
            levels=6,
            colors="k",
            linestyles="--",
            linewidths=0.8,
        )
        # log density: the aggregate is a mixture of narrow bumps, and a linear
        # colour scale would show only its highest peaks
        log_q = densities[loss].clamp_min(1e-300).log()
        top = log_q.max().item()
        levels = torch.linspace(top - 8, top, 13).tolist()
        ax.contourf(zz1, zz2, log_q.clamp_min(top - 8), levels=levels, cmap="Blues")
        name = "ELBO" if loss == "elbo" else f"InfoVAE ({loss})"
        kl = results[loss]["aggregate_kl_to_prior_nats"]
        ax.set_title(f"{name}: KL(q(z)||p(z)) = {kl:.2f} nats")
        ax.set_xlabel("z1")
        ax.set_aspect("equal")
    axes[0].set_ylabel("z2")
    fig.suptitle(
        f"log q(z), aggregate posterior (filled, 8 nats of range) against "
        f"p(z) = N(0, I) (dashed), "
        f"{len(x_train)} {args.dataset} training images"
    )
    save_outputs(args, "contours_2d", fig, results)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_flags(parser)
    parser.add_argument("--n", type=int, default=500, help="training images")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    if args.small:
        args.dataset, args.hidden, args.n = "digits", (64,), min(args.n, 300)
        args.steps = args.steps or 60
    args.steps = args.steps or 3000
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
