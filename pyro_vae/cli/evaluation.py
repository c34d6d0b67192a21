"""Run the evaluation on one split and write its files into a run directory.

* ``evaluation.json``: mean ELBO, mean log p̂(x) ± se, the IWAE_k table, the gap, a
  k̂ summary, K, n, seconds, the split and its binarization, and the latent
  diagnostics of :mod:`pyro_vae.evaluate.latents` under ``latents``;
* ``evaluation.nc``: ArviZ InferenceData: a few posterior draws of z per datum in
  ``posterior`` and, in the group ``evaluation``, per-datum log p̂(x), its se, the
  ELBO, the gap, k̂ and ESS;
* ``figures/iwae_vs_k.png`` and ``figures/khat.png``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from pyro import poutine

from pyro_vae.cli import plots
from pyro_vae.evaluate.check import check_against_pyro, check_consistency
from pyro_vae.evaluate.latents import latent_diagnostics
from pyro_vae.evaluate.marginal import LogMarginal, log_marginal
from pyro_vae.files import atomic_path, atomic_write_text
from pyro_vae.rng import forked_rng

__all__ = [
    "POSTERIOR_DRAWS",
    "evaluate_split",
    "format_summary",
    "latents_line",
    "posterior_draws",
]

POSTERIOR_DRAWS = 8


def evaluate_split(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    out: str | os.PathLike,
    *,
    k: int,
    seed: int,
    split: str,
    binarization: str,
) -> dict:
    """Estimate log p(x) on ``x``, check it, write the files; return the summary."""
    out = Path(out)
    result = log_marginal(model, guide, x, k, seed=seed)
    violations = check_consistency(result)
    against_pyro = check_against_pyro(model, guide, x, result, seed=seed)
    summary = {
        **result.summary(),
        "latents": latent_diagnostics(model, guide, x, seed=seed),
        "split": split,
        "binarization": binarization,
        "estimator": (
            f"importance sampling with the guide as proposal, K = {k} per datum; "
            "se by the delta method; IWAE_k from disjoint groups of k"
        ),
        "units": "nats per datum, higher is better",
        "consistency_violations_within_chance": violations,
        "check_against_pyro_trace_elbo": against_pyro,
        "chunks": result.chunks,
    }
    _write_json(out / "evaluation.json", summary)
    _write_netcdf(out / "evaluation.nc", result, posterior_draws(guide, x, seed))
    plots.plot_iwae_vs_k(summary, out / "figures" / "iwae_vs_k.png")
    plots.plot_khat(result.khat.numpy(), out / "figures" / "khat.png")
    return summary


def format_summary(summary: dict) -> str:
    """The evaluation table, in nats per datum."""
    rows = [
        f"{summary['split']} split, n = {summary['n']}, K = {summary['k']} "
        f"({summary['seconds']:.1f} s)",
        f"{'estimate':<14}{'nats/datum':>12}{'± se':>10}",
        f"{'ELBO':<14}{summary['elbo']['mean']:12.3f}{summary['elbo']['se']:10.3f}",
    ]
    for k, v in summary["iwae"].items():
        if 1 < int(k) < summary["k"]:
            rows.append(f"{'IWAE_' + k:<14}{v['mean']:12.3f}{v['se']:10.3f}")
    lp, gap, khat = summary["log_px"], summary["gap"], summary["khat"]
    rows += [
        f"{'log p̂(x)':<14}{lp['mean']:12.3f}{lp['se']:10.3f}",
        f"{'gap (KL)':<14}{gap['mean']:12.3f}{gap['se']:10.3f}",
        _khat_line(khat),
    ]
    if "latents" in summary:
        rows.append(latents_line(summary["latents"]))
    return "\n".join(rows)


def latents_line(lat: dict) -> str:
    """One line of latent diagnostics (see :mod:`pyro_vae.evaluate.latents`)."""
    mi = lat["mutual_information"]
    mi_text = (
        "n/a"
        if mi is None
        else f"{mi:.3f} nats (max {lat['mutual_information_max']:.2f})"
    )
    mmd, log_det, active = lat["mmd"], lat["log_det_cov"], lat["active_units"]
    return (  # None: too few data to tell (pyro_vae.evaluate.latents)
        f"latents: MMD(q(z), p(z)) {'n/a' if mmd is None else f'{mmd:.4f}'}; log "
        f"det Cov q(z) {'n/a' if log_det is None else f'{log_det:.3f}'}; active "
        f"units {'n/a' if active is None else active}/{lat['latent_dim']}; I(x; z) "
        f"{mi_text}"
    )


def _khat_line(khat: dict) -> str:
    line = f"{100 * khat['fraction_above_0.7']:.1f}% of data above 0.7 (unreliable)"
    if khat["mean"] is not None:
        line = f"mean {khat['mean']:.3f}, max {khat['max']:.3f}, " + line
    if khat["not_fitted"]:
        line += f"; {khat['not_fitted']} not fitted (too few samples)"
    return "k̂: " + line


@torch.no_grad()
def posterior_draws(
    guide: Callable, x: torch.Tensor, seed: int, draws: int = POSTERIOR_DRAWS
) -> torch.Tensor:
    """``draws`` samples of z ~ q(z|x) per datum, ``(draws, N, d)``."""
    with forked_rng(x):
        torch.manual_seed(seed)
        with pyro.plate("particles", draws, dim=-2):
            trace = poutine.trace(guide).get_trace(x)
    return trace.nodes["z"]["value"].reshape(draws, len(x), -1).cpu()


def _write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def _write_netcdf(path: Path, result: LogMarginal, z: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's refactor notice; custom group
        import arviz as az
        import xarray as xr

        per_datum = {
            "log_px": result.log_px,
            "log_px_se": result.log_px_se,
            "elbo": result.elbo,
            "gap": result.gap,
            "khat": result.khat,
            "ess": result.ess,
        }
        evaluation = xr.Dataset(
            {name: ("datum", value.numpy()) for name, value in per_datum.items()},
            attrs={"K": result.k, "units": "nats per datum"},
        )
        posterior = az.dict_to_dataset(
            {"z": z.double().numpy()[None]}, dims={"z": ["datum", "latent"]}
        )
        idata = az.InferenceData(posterior=posterior, evaluation=evaluation)
        with atomic_path(path) as tmp:
            idata.to_netcdf(str(tmp))
