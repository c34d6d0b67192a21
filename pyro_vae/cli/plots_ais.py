"""Figures of an AIS evaluation: IS − AIS against k̂, and the BDMC sandwich.

Drawn headless with matplotlib's object API, as :mod:`pyro_vae.cli.plots` draws.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pyro_vae.cli.plots import _save, _subplots
from pyro_vae.evaluate.psis import KHAT_UNRELIABLE

__all__ = ["plot_bdmc", "plot_is_vs_ais"]


def plot_is_vs_ais(khat: np.ndarray, diff: np.ndarray, path: str | Path) -> Path:
    """IS − AIS log p̂(x) per datum against the datum's k̂, with a line at 0.7.

    Both are lower bounds: points well above 0 are data where IS beat AIS (a badly
    tuned chain, or a bug); points below 0 where k̂ > 0.7 are data where heavy-tailed
    importance weights left IS low, as k̂ warns.
    """
    fig, ax = _subplots(figsize=(6, 4))
    fitted = np.isfinite(khat) & np.isfinite(diff)
    ax.scatter(khat[fitted], diff[fitted], s=10, alpha=0.7, color="steelblue")
    ax.axvline(KHAT_UNRELIABLE, ls="--", c="k", label="k̂ = 0.7: IS unreliable above")
    ax.axhline(0.0, ls=":", c="gray", label="IS = AIS")
    ax.set_xlabel("Pareto k̂ of the datum's importance weights")
    ax.set_ylabel("IS − AIS log p̂(x) (nats)")
    title = f"IS − AIS per datum against k̂ (n = {len(diff)})"
    if not fitted.all():
        title += f"; {int((~fitted).sum())} without k̂ not shown"
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_bdmc(bdmc: dict, path: str | Path) -> Path:
    """BDMC lower and upper bounds (mean over data ± se) against steps, log x."""
    rows = bdmc["rows"]
    steps = np.array([r["steps"] for r in rows])
    fig, ax = _subplots(figsize=(6, 4))
    for key, label, marker in (
        ("upper", "upper bound: reverse AIS from the exact z", "v"),
        ("lower", "lower bound: forward AIS", "^"),
    ):
        means = np.array([r[key]["mean"] for r in rows])
        ses = np.array([_number(r[key]["se"]) for r in rows])
        ax.errorbar(steps, means, yerr=ses, marker=marker, capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.minorticks_off()
    ax.set_xlabel("AIS steps")
    ax.set_ylabel("log p(x), nats per datum (mean ± se)")
    ax.set_title(
        f"BDMC on {bdmc['n']} simulated data: the gap should shrink with steps"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _number(value: float | None) -> float:
    return 0.0 if value is None else float(value)
