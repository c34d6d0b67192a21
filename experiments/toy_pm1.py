"""Experiment 1: x in {-1, +1}; the ELBO against InfoVAE (InfoVAE note, section 3).

Data are x = -1 and x = +1, equally often. The model is p(z) = N(0, 1) in one
dimension, p(x|z) = N(f(z), sigma^2) with an MLP f and a small sigma, and q(z|x) is
an amortized Normal. With a flexible decoder the ELBO prefers posteriors that tell the
two inputs apart with little overlap, paying KL to move them away from the prior:
the aggregate q(z) = (q(z|-1) + q(z|+1)) / 2 becomes two separated bumps, not N(0, 1).
InfoVAE (mmd-vae: no KL, lambda * MMD(q(z), p(z))) asks the aggregate to match the
prior, so the two posteriors split N(0, 1) between them.

Everything is one-dimensional, so KL(q(z) || p(z)) of the aggregate is computed by
quadrature on a grid, exactly up to grid error. Writes ``toy_pm1.png`` (densities) and
``toy_pm1.json`` (means, sds, overlap and the aggregate's KL and MMD to the prior).

    python experiments/toy_pm1.py            # full: 4000 steps
    python experiments/toy_pm1.py --small    # the test's settings
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
from common import RESULTS, fit, write_json  # noqa: E402

from pyro_vae.losses import Kernel, mmd2  # noqa: E402

GRID = torch.linspace(-6, 6, 4001, dtype=torch.float64)


def posterior_params(guide, x_value: float) -> tuple[float, float]:
    loc, scale = guide.encode(torch.tensor([[x_value]]))
    return loc.item(), scale.item()


def normal_pdf(z: torch.Tensor, loc: float, scale: float) -> torch.Tensor:
    return torch.exp(-0.5 * ((z - loc) / scale) ** 2) / (scale * math.sqrt(2 * math.pi))


def summarize(guide, seed: int) -> dict:
    (m_neg, s_neg), (m_pos, s_pos) = (
        posterior_params(guide, -1.0),
        posterior_params(guide, 1.0),
    )
    q_neg, q_pos = normal_pdf(GRID, m_neg, s_neg), normal_pdf(GRID, m_pos, s_pos)
    aggregate, prior = (q_neg + q_pos) / 2, normal_pdf(GRID, 0.0, 1.0)
    dz = (GRID[1] - GRID[0]).item()
    kl = (aggregate * (aggregate.clamp_min(1e-300).log() - prior.log())).sum() * dz
    overlap = torch.minimum(q_neg, q_pos).sum() * dz  # 1 = identical, 0 = disjoint
    gen = torch.Generator().manual_seed(seed)
    z_q = torch.cat(
        [
            m_neg + s_neg * torch.randn(1000, 1, generator=gen),
            m_pos + s_pos * torch.randn(1000, 1, generator=gen),
        ]
    )
    z_p = torch.randn(2000, 1, generator=gen)
    return {
        "q(z|x=-1)": {"mean": m_neg, "sd": s_neg},
        "q(z|x=+1)": {"mean": m_pos, "sd": s_pos},
        "separation_in_sds": abs(m_pos - m_neg) / math.sqrt((s_neg**2 + s_pos**2) / 2),
        "posterior_overlap": overlap.item(),
        "aggregate_kl_to_prior_nats": kl.item(),
        "aggregate_mmd_to_prior": mmd2(z_q, z_p, Kernel("rbf", "dim")).item(),
        "aggregate_sd": math.sqrt(
            (s_neg**2 + s_pos**2) / 2 + ((m_pos - m_neg) / 2) ** 2
        ),
    }, (q_neg, q_pos, aggregate, prior)


def run(args: argparse.Namespace, steps: int) -> dict:
    x = torch.tensor([[-1.0], [1.0]]).repeat(256, 1)
    results, curves = {}, {}
    losses = ("elbo", args.loss)
    for loss in losses:
        _, guide, history = fit(
            x,
            x[:64],
            loss=loss,
            steps=steps,
            latent_dim=1,
            hidden=(64, 64),
            likelihood=args.likelihood,
            sigma=args.sigma,
            lam=args.lam,
            alpha=args.alpha,
            kernel=args.kernel,
            batch_size=128,
            lr=3e-3,
            seed=args.seed,
            dynamic=False,
        )
        results[loss], curves[loss] = summarize(guide, args.seed)
        results[loss]["final_elbo_nats"] = history[-1].valid_elbo
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, loss in zip(axes, losses, strict=True):
        q_neg, q_pos, aggregate, prior = curves[loss]
        ax.plot(GRID, prior, "k--", label="p(z) = N(0, 1)")
        ax.plot(GRID, q_neg, label="q(z | x = -1)")
        ax.plot(GRID, q_pos, label="q(z | x = +1)")
        ax.plot(GRID, aggregate, lw=2, alpha=0.6, label="aggregate q(z)")
        r = results[loss]
        ax.set_title(
            f"{'ELBO' if loss == 'elbo' else 'InfoVAE (' + loss + ')'}: "
            f"KL(q(z)||p(z)) = {r['aggregate_kl_to_prior_nats']:.3f} nats"
        )
        ax.set_xlabel("z")
        ax.set_xlim(-5, 5)
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"x in {{-1, +1}}, {args.likelihood} likelihood, {steps} steps")
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "toy_pm1.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    settings = {k: str(v) for k, v in vars(args).items()} | {"steps": steps}
    write_json(args.out / "toy_pm1.json", {"settings": settings, **results})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the test's settings")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--likelihood", default="gaussian-learned")
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--loss", default="infovae", help="the InfoVAE preset")
    parser.add_argument("--alpha", type=float, default=0.0)
    parser.add_argument("--lam", type=float, default=100.0)
    parser.add_argument("--kernel", default="rbf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    steps = args.steps or (400 if args.small else 4000)
    results = run(args, steps)
    for loss, r in results.items():
        neg, pos = r["q(z|x=-1)"], r["q(z|x=+1)"]
        print(
            f"{loss:>8}: q(z|-1) = N({neg['mean']:+.2f}, {neg['sd']:.3f}^2), "
            f"q(z|+1) = N({pos['mean']:+.2f}, {pos['sd']:.3f}^2), aggregate KL to "
            f"prior {r['aggregate_kl_to_prior_nats']:.3f} nats, MMD "
            f"{r['aggregate_mmd_to_prior']:.4f}, ELBO {r['final_elbo_nats']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
