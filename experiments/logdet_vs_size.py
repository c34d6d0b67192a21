"""Experiment 2: log det Cov[q(z)] against training-set size, ELBO against InfoVAE.

For a standard-normal prior, the aggregate posterior q(z) = E_x q(z|x) should have
Cov[q(z)] = I, so log det Cov[q(z)] = 0. The InfoVAE note (Fig. 2 of the paper)
reports that ELBO training strays far from 0, the more so the smaller the training
set, while InfoVAE with MMD stays near 0. Here both are trained for the same number of
steps on the first n training images for each n, and log det Cov[q(z)] is measured on
those training images and on the test split (one z ~ q(z|x) per image).

Writes ``logdet_vs_size.png`` and ``logdet_vs_size.json``.

    python experiments/logdet_vs_size.py     # full: Fashion-MNIST, n = 500 ... 54000
    python experiments/logdet_vs_size.py --small
"""

from __future__ import annotations

import argparse
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
    write_json,
)

from pyro_vae.evaluate.latents import latent_diagnostics  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    splits = load(args)
    rows = []
    for n in args.sizes:
        x_train = splits.train[:n]
        for loss in ("elbo", args.loss):
            model, guide, history = fit_with_flags(
                args, x_train, splits.valid[:1000], loss
            )
            # Score on a fixed binarization of the training images used.
            gen = torch.Generator().manual_seed(1)
            x_scored = torch.bernoulli(x_train[: args.max_eval], generator=gen)
            train_lat = latent_diagnostics(model, guide, x_scored, seed=args.seed)
            test_lat = latent_diagnostics(
                model, guide, splits.test[: args.max_eval], seed=args.seed
            )
            rows.append(
                {
                    "n_train": len(x_train),
                    "loss": loss,
                    "logdet_train": train_lat["log_det_cov"],
                    "logdet_test": test_lat["log_det_cov"],
                    "mmd_test": test_lat["mmd"],
                    "active_units": test_lat["active_units"],
                    "valid_elbo": history[-1].valid_elbo,
                }
            )
            print(rows[-1], flush=True)
    plot(rows, args)
    write_json(
        args.out / "logdet_vs_size.json", {"settings": _settings(args), "rows": rows}
    )
    return {"rows": rows}


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for loss, color in (("elbo", "tab:red"), (args.loss, "tab:blue")):
        mine = [r for r in rows if r["loss"] == loss]
        sizes = [r["n_train"] for r in mine]
        name = "ELBO" if loss == "elbo" else f"InfoVAE ({loss})"
        ax.plot(
            sizes,
            [r["logdet_train"] for r in mine],
            "o-",
            c=color,
            label=f"{name}, training images",
        )
        ax.plot(
            sizes,
            [r["logdet_test"] for r in mine],
            "s--",
            c=color,
            label=f"{name}, test images",
        )
    ax.axhline(0, c="k", lw=0.8, label="p(z) = N(0, I): 0")
    ax.set_xscale("log")
    ax.set_xlabel("training-set size")
    ax.set_ylabel("log det Cov[q(z)]")
    ax.set_title(f"{args.dataset}, d = {args.latent_dim}, {args.steps} steps each")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "logdet_vs_size.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def _settings(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_flags(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--max-eval", type=int, default=5000)
    args = parser.parse_args(argv)
    if args.small:
        args.dataset, args.latent_dim, args.hidden = "digits", 4, (64,)
        args.sizes, args.steps = args.sizes or [100, 1000], args.steps or 60
    args.sizes = args.sizes or [500, 2000, 10000, 54000]
    args.steps = args.steps or 3000
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
