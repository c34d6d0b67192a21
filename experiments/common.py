"""Shared pieces of the experiments: train a VAE under the ELBO or an InfoVAE loss.

Each experiment script is runnable on its own (``python experiments/NAME.py``) with
its full settings, and with ``--small`` for the settings the test suite uses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyro
import torch

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.data import Splits
from pyro_vae.losses import infovae_preset, make_kernel
from pyro_vae.training.loop import Schedule, make_elbo, train

RESULTS = Path(__file__).resolve().parent / "results"


def fit(
    x_train: torch.Tensor,
    x_valid: torch.Tensor,
    *,
    loss: str,
    steps: int,
    latent_dim: int,
    hidden: tuple[int, ...] = (400,),
    likelihood: str = "bernoulli",
    sigma: float = 1.0,
    lam: float = 1000.0,
    alpha: float = 0.0,
    kernel: str = "rbf",
    bandwidth: str = "dim",
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    dynamic: bool = True,
):
    """Train for about ``steps`` optimizer steps; ``loss`` is "elbo" or a preset."""
    pyro.settings.set(module_local_params=True)
    pyro.set_rng_seed(seed)
    cfg = FitConfig(
        latent_dim=latent_dim,
        hidden=hidden,
        likelihood=likelihood,
        sigma=sigma,
        sigma_floor=min(1e-3, sigma / 2),
    )
    model, guide = build_model_and_guide(cfg, x_train.shape[1])
    batch_size = min(batch_size, len(x_train))
    epochs = max(1, math.ceil(steps * batch_size / len(x_train)))
    objective = None
    if loss != "elbo":
        objective = infovae_preset(
            loss, alpha=alpha, lam=lam, kernel=make_kernel(kernel, bandwidth)
        )
    history, _ = train(
        model,
        guide,
        Splits.of(x_train, x_valid, binarization="dynamic" if dynamic else "none"),
        Schedule(epochs=epochs, batch_size=batch_size, lr=lr),
        elbo=make_elbo("trace"),
        objective=objective,
    )
    model.eval(), guide.eval()
    return model, guide, history


def fit_with_flags(args, x_train, x_valid, loss: str, **overrides):  # noqa: ANN001, ANN201
    """:func:`fit` with the settings of :func:`add_model_flags` (overrides win)."""
    settings = {
        "steps": args.steps,
        "latent_dim": args.latent_dim,
        "hidden": args.hidden,
        "lam": args.lam,
        "alpha": args.alpha,
        "seed": args.seed,
    }
    return fit(x_train, x_valid, loss=loss, **(settings | overrides))


def save_outputs(args, name: str, fig, results: dict) -> None:  # noqa: ANN001
    """Write ``NAME.png`` and ``NAME.json`` (the settings, then the results)."""
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / f"{name}.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
    }
    write_json(args.out / f"{name}.json", {"settings": settings, **results})


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def add_model_flags(parser) -> None:  # noqa: ANN001
    """Flags every image experiment shares."""
    parser.add_argument("--small", action="store_true", help="the test's settings")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument(
        "--hidden", type=lambda s: tuple(int(w) for w in s.split(",")), default=(400,)
    )
    parser.add_argument("--loss", default="infovae", help="the InfoVAE preset")
    parser.add_argument("--alpha", type=float, default=0.0)
    parser.add_argument("--lam", type=float, default=1000.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)


def load(args):  # noqa: ANN001, ANN201
    """The dataset's splits, binarized as for a Bernoulli likelihood (dynamic)."""
    from pyro_vae.data import binarize_splits
    from pyro_vae.data.sources import load_dataset

    splits = load_dataset(args.dataset, data_dir=args.data_dir)
    return binarize_splits(splits, "dynamic")
