"""Run the evaluation on one split and write its files into a run directory.

By importance sampling (``method="is"``, the default), annealed importance sampling
(``"ais"``) or both, with the BDMC check of AIS when asked (:mod:`.evaluation_ais`).

* ``evaluation.json``: for IS, mean ELBO, mean log p̂(x) ± se, the IWAE_k table, the
  gap, a k̂ summary, K, n, seconds; for AIS the ``ais`` section, ``is_minus_ais`` (both)
  and ``bdmc``, with ``ais_warnings``; always the split, its binarization and the
  latent diagnostics of :mod:`pyro_vae.evaluate.latents` under ``latents``;
* ``evaluation.nc``: ArviZ InferenceData: a few posterior draws of z per datum in
  ``posterior`` and, in the group ``evaluation``, per-datum log p̂(x), its se, the
  ELBO, the gap, k̂ and ESS (IS), ``log_px_ais``, ``log_px_ais_se`` and
  ``acceptance_ais`` (AIS);
* ``figures/iwae_vs_k.png`` and ``figures/khat.png`` (IS), ``figures/is_vs_ais.png``
  (both) and ``figures/bdmc.png`` (BDMC). A figure of an earlier evaluation that this
  one does not draw is removed: it would describe other numbers.

The work is in two steps, so that the data can be split between them: :func:`estimate`
computes the per-datum estimates of a tensor ``x`` (a shard of a split, with
``index_offset``), and :func:`write_evaluation` checks them, summarizes them and writes
the files. :func:`evaluate_split` does both, with the BDMC check between.
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

from pyro_vae.cli import plots, plots_ais
from pyro_vae.cli.evaluation_ais import (
    AISOptions,
    Estimates,
    ais_lines,
    ais_section,
    ais_warnings,
    compare,
    json_safe,
    run_bdmc,
)
from pyro_vae.cli.evaluation_sharded import estimate_sharded
from pyro_vae.evaluate.bdmc import BDMCResult
from pyro_vae.evaluate.check import check_against_pyro, check_consistency
from pyro_vae.evaluate.latents import latent_diagnostics
from pyro_vae.evaluate.marginal import LogMarginal
from pyro_vae.files import atomic_path, atomic_write_text
from pyro_vae.rng import forked_rng

__all__ = [
    "POSTERIOR_DRAWS",
    "Estimates",
    "evaluate_split",
    "format_summary",
    "latents_line",
    "posterior_draws",
    "write_evaluation",
]

POSTERIOR_DRAWS = 8
#: the figures of an evaluation, each drawn only by some methods
FIGURES = ("iwae_vs_k", "khat", "is_vs_ais", "bdmc")


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
    method: str = "is",
    options: AISOptions = AISOptions(),  # noqa: B008 - frozen, never mutated
) -> dict:
    """Estimate log p(x) on ``x``, check it, write the files; return the summary."""
    # one process, through the same path as python -m pyro_vae.evaluate
    estimates = estimate_sharded(
        None, model, guide, x, method=method, k=k, seed=seed, options=options
    )
    sandwich = run_bdmc(model, guide, options, seed=seed, device=x.device)
    return write_evaluation(
        model,
        guide,
        x,
        out,
        estimates,
        sandwich,
        seed=seed,
        split=split,
        binarization=binarization,
    )


def write_evaluation(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    out: str | os.PathLike,
    estimates: Estimates,
    sandwich: BDMCResult | None,
    *,
    seed: int,
    split: str,
    binarization: str,
) -> dict:
    """Check and summarize ``estimates`` of ``x``; write the files; the summary."""
    out = Path(out)
    result, ais = estimates.importance, estimates.ais
    if result is not None:  # the keys in the order of an IS evaluation of old
        checks = _importance_checks(model, guide, x, result, seed)
        first = result.summary()
        estimator = (
            f"importance sampling with the guide as proposal, K = {result.k} per "
            "datum; se by the delta method; IWAE_k from disjoint groups of k"
        )
    else:
        checks, first = {}, {"n": len(x), "seconds": ais.seconds}
        estimator = "annealed importance sampling (see ais)"
    summary = {
        **first,
        "latents": latent_diagnostics(model, guide, x, seed=seed),
        "split": split,
        "binarization": binarization,
        "estimator": estimator,
        "units": "nats per datum, higher is better",
        **checks,
        **_ais_summary(estimates, sandwich),
    }
    _write_json(out / "evaluation.json", summary)
    _write_netcdf(out / "evaluation.nc", estimates, posterior_draws(guide, x, seed))
    _draw(out / "figures", summary, estimates)
    return summary


def _importance_checks(
    model: Callable, guide: Callable, x: torch.Tensor, result: LogMarginal, seed: int
) -> dict:
    """Both checks of the IS estimates (raise on a bug), and its chunks."""
    return {
        "consistency_violations_within_chance": check_consistency(result),
        "check_against_pyro_trace_elbo": check_against_pyro(
            model, guide, x, result, seed=seed
        ),
        "chunks": result.chunks,
    }


def _ais_summary(estimates: Estimates, sandwich: BDMCResult | None) -> dict:
    """``ais``, ``is_minus_ais``, ``bdmc`` and ``ais_warnings``, as far as they ran."""
    part: dict = {}
    if estimates.ais is not None:
        part["ais"] = ais_section(estimates.ais)
        if estimates.importance is not None:
            part["is_minus_ais"] = json_safe(
                compare(estimates.importance, estimates.ais)
            )
    if sandwich is not None:
        part["bdmc"] = json_safe(sandwich.summary())
    if part:
        part["ais_warnings"] = ais_warnings(part)
    return part


def _draw(figures: Path, summary: dict, estimates: Estimates) -> None:
    """Draw this evaluation's figures; remove those of an earlier one it has not."""
    result, ais = estimates.importance, estimates.ais
    drawn = set()
    if result is not None:
        plots.plot_iwae_vs_k(summary, figures / "iwae_vs_k.png")
        plots.plot_khat(result.khat.numpy(), figures / "khat.png")
        drawn |= {"iwae_vs_k", "khat"}
    if result is not None and ais is not None:
        diff = (result.log_px - ais.log_px).numpy()
        plots_ais.plot_is_vs_ais(result.khat.numpy(), diff, figures / "is_vs_ais.png")
        drawn.add("is_vs_ais")
    if "bdmc" in summary:
        plots_ais.plot_bdmc(summary["bdmc"], figures / "bdmc.png")
        drawn.add("bdmc")
    for name in set(FIGURES) - drawn:
        (figures / f"{name}.png").unlink(missing_ok=True)


def format_summary(summary: dict) -> str:
    """The evaluation table, in nats per datum; the AIS rows and warnings after."""
    if "log_px" in summary:
        rows = _importance_lines(summary)
    else:  # AIS alone
        rows = [
            f"{summary['split']} split, n = {summary['n']}, AIS "
            f"({summary['seconds']:.1f} s)",
            f"{'estimate':<14}{'nats/datum':>12}{'± se':>10}",
        ]
    rows += ais_lines(summary)
    if "latents" in summary:
        rows.append(latents_line(summary["latents"]))
    rows += [f"WARNING: {warning}" for warning in summary.get("ais_warnings", [])]
    return "\n".join(rows)


def _importance_lines(summary: dict) -> list[str]:
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
    return rows + [
        f"{'log p̂(x)':<14}{lp['mean']:12.3f}{lp['se']:10.3f}",
        f"{'gap (KL)':<14}{gap['mean']:12.3f}{gap['se']:10.3f}",
        _khat_line(khat),
    ]


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


def _write_netcdf(path: Path, estimates: Estimates, z: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's refactor notice; custom group
        import arviz as az
        import xarray as xr

        per_datum, attrs = {}, {}
        result, ais = estimates.importance, estimates.ais
        if result is not None:
            per_datum |= {
                "log_px": result.log_px,
                "log_px_se": result.log_px_se,
                "elbo": result.elbo,
                "gap": result.gap,
                "khat": result.khat,
                "ess": result.ess,
            }
            attrs["K"] = result.k
        if ais is not None:
            per_datum |= {
                "log_px_ais": ais.log_px,
                "log_px_ais_se": ais.log_px_se,
                "acceptance_ais": ais.acceptance,
            }
            attrs |= {f"ais_{key}": value for key, value in ais.settings().items()}
        evaluation = xr.Dataset(
            {name: ("datum", value.numpy()) for name, value in per_datum.items()},
            attrs={**attrs, "units": "nats per datum"},
        )
        posterior = az.dict_to_dataset(
            {"z": z.double().numpy()[None]}, dims={"z": ["datum", "latent"]}
        )
        idata = az.InferenceData(posterior=posterior, evaluation=evaluation)
        with atomic_path(path) as tmp:
            idata.to_netcdf(str(tmp))
