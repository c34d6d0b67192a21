"""Experiment 4: reconstructions and prior samples on Fashion-MNIST, ELBO vs InfoVAE.

Both models share networks, data and seed; one is trained on the ELBO, the other on an
InfoVAE loss. The figure shows, side by side, test images with their reconstructions
(the mean of p(x|z) at z ~ q(z|x)) and the means of p(x|z) at prior draws z ~ p(z).
Each model is also scored by importance sampling: test log p̂(x) with K samples per
image, its Monte Carlo se, the ELBO and the k̂ summary (pyro_vae.evaluate).

Writes ``recon_samples.png`` and ``recon_samples.json``.

    python experiments/recon_samples.py      # full: Fashion-MNIST, 20 epochs, K = 1000
    python experiments/recon_samples.py --small
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_model_flags,
    fit_with_flags,
    load,
    save_outputs,
)

from pyro_vae.cli.generate import reconstruct, sample_prior  # noqa: E402
from pyro_vae.cli.plots import image_grid  # noqa: E402
from pyro_vae.evaluate import check_consistency, log_marginal  # noqa: E402
from pyro_vae.evaluate.latents import latent_diagnostics  # noqa: E402

N_SHOWN = 32


def run(args: argparse.Namespace) -> dict:
    splits = load(args)
    x_show, x_eval = splits.test[:N_SHOWN], splits.test[: args.n_eval]
    results, pictures = {}, {}
    for loss in ("elbo", args.loss):
        model, guide, history = fit_with_flags(
            args, splits.train, splits.valid[:1000], loss
        )
        pictures[loss] = (
            reconstruct(model, guide, x_show),
            sample_prior(model, x_show),
        )
        lm = log_marginal(model, guide, x_eval, args.k, seed=args.seed)
        check_consistency(lm)
        summary = lm.summary()
        results[loss] = {
            "test_log_px": summary["log_px"],
            "test_elbo": summary["elbo"],
            "gap": summary["gap"],
            "khat": summary["khat"],
            "latents": latent_diagnostics(model, guide, x_eval, seed=args.seed),
            "valid_elbo_last_epoch": history[-1].valid_elbo,
            "epochs": len(history),
        }
        print(
            loss,
            {k: results[loss][k] for k in ("test_log_px", "test_elbo")},
            flush=True,
        )
    shape = splits.image_shape
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    axes[0, 0].imshow(image_grid(x_show, shape), cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title("test images x")
    axes[1, 0].axis("off")
    for col, loss in enumerate(("elbo", args.loss), start=1):
        rec, samples = pictures[loss]
        lp = results[loss]["test_log_px"]
        name = "ELBO" if loss == "elbo" else f"InfoVAE ({loss})"
        axes[0, col].imshow(image_grid(rec, shape), cmap="gray", vmin=0, vmax=1)
        axes[0, col].set_title(
            f"{name}: reconstructions\n"
            f"log p̂(x) = {lp['mean']:.2f} ± {lp['se']:.2f} nats"
        )
        axes[1, col].imshow(image_grid(samples, shape), cmap="gray", vmin=0, vmax=1)
        axes[1, col].set_title(f"{name}: prior samples E[x|z]")
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(
        f"{args.dataset}, d = {args.latent_dim}, K = {args.k} importance samples on "
        f"{len(x_eval)} test images (dynamic binarization)"
    )
    save_outputs(args, "recon_samples", fig, results)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_flags(parser)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--n-eval", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.small:
        args.dataset, args.hidden, args.latent_dim = "digits", (64,), 4
        args.steps, args.k, args.n_eval = args.steps or 60, 50, 100
    args.steps = args.steps or 10800  # 20 epochs of 54000 images in batches of 100
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
