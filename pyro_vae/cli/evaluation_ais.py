"""The AIS and BDMC parts of an evaluation: settings, summary sections, the loud check.

``python -m pyro_vae.evaluate --method ais|both`` and ``fit --eval-method`` add to
``evaluation.json``:

* ``ais``: :meth:`~pyro_vae.evaluate.ais.AISResult.summary` (mean log p̂_AIS(x) ± se,
  the settings, acceptance, step sizes, seconds) with a line on the estimator;
* ``is_minus_ais`` (``both``): mean IS − AIS with its paired se, and how the per-datum
  difference relates to the importance weights' k̂;
* ``bdmc`` (``--bdmc N``): :meth:`~pyro_vae.evaluate.bdmc.BDMCResult.summary`;
* ``ais_warnings``: the loud check. IS and AIS are both stochastic lower bounds of
  log p(x), and AIS with enough steps is the tighter; IS above AIS by more than 3 se,
  or a BDMC gap that does not shrink as steps grow, means a bug or a badly tuned
  chain. Each warning says so and what to try; the terminal prints it as a
  ``WARNING:`` line and ``report.md`` shows it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pyro_vae.cli.config import EVAL_METHODS
from pyro_vae.evaluate.ais import AISResult, ais_log_marginal
from pyro_vae.evaluate.bdmc import BDMCResult, bdmc
from pyro_vae.evaluate.marginal import LogMarginal
from pyro_vae.evaluate.psis import KHAT_UNRELIABLE

__all__ = [
    "Estimates",
    "METHODS",
    "SE_LIMIT",
    "AISOptions",
    "ais_lines",
    "ais_section",
    "ais_warnings",
    "compare",
    "json_safe",
    "run_ais",
    "run_bdmc",
]

#: ``--method``: importance sampling, annealed importance sampling, or both
METHODS = EVAL_METHODS
#: IS above AIS by more than this many standard errors is reported loudly
SE_LIMIT = 3.0


@dataclass(frozen=True)
class AISOptions:
    """AIS settings of an evaluation, and the BDMC check (``bdmc = 0`` skips it)."""

    steps: int = 1000
    chains: int = 16
    leapfrog: int = 10
    bdmc: int = 0
    bdmc_steps: tuple[int, ...] = (100, 1000)


@dataclass(frozen=True)
class Estimates:
    """Per-datum estimates of one tensor of data: IS, AIS, or both."""

    importance: LogMarginal | None
    ais: AISResult | None


def run_ais(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    options: AISOptions,
    *,
    seed: int,
    index_offset: int = 0,
) -> AISResult:
    """log p̂_AIS(x) per datum of ``x`` (a shard starting at ``index_offset``)."""
    return ais_log_marginal(
        model,
        guide,
        x,
        steps=options.steps,
        chains=options.chains,
        leapfrog=options.leapfrog,
        seed=seed,
        index_offset=index_offset,
    )


def run_bdmc(
    model: Callable,
    guide: Callable,
    options: AISOptions,
    *,
    seed: int,
    device: torch.device,
) -> BDMCResult | None:
    """The BDMC sandwich on ``options.bdmc`` simulated data; None when it is 0."""
    if not options.bdmc:
        return None
    return bdmc(
        model,
        guide,
        options.bdmc,
        steps=options.bdmc_steps,
        chains=options.chains,
        leapfrog=options.leapfrog,
        seed=seed,
        device=device,
    )


def ais_section(result: AISResult) -> dict:
    """The ``ais`` section of ``evaluation.json`` (NaN, e.g. the step size of a
    one-step run, which has no transition, becomes null)."""
    return json_safe(
        {
            **result.summary(),
            "estimator": (
                f"annealed importance sampling from the guide to p(z | x), "
                f"{result.steps} steps ({result.schedule} schedule), {result.chains} "
                f"chains per datum, HMC with {result.leapfrog} leapfrog steps and step "
                f"sizes tuned in a {result.pilot_steps}-step pilot; se by the delta "
                "method over the chains"
            ),
            "chunks": result.chunks,
        }
    )


def json_safe(value: object) -> object:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def compare(importance: LogMarginal, ais: AISResult) -> dict:
    """IS − AIS per datum: its mean with the paired se, and its relation to k̂.

    The se of the mean difference is sqrt(Σ (se_IS² + se_AIS²)) / n, exact for
    independent draws. With the same seed AIS's starting points can be some of IS's
    draws (:mod:`pyro_vae.evaluate.ais`); the errors are then positively
    correlated and this se overstates the difference's, so the 3-se check errs on
    the quiet side, never on the loud one.
    """
    diff = importance.log_px - ais.log_px
    n = len(diff)
    se = (importance.log_px_se.square() + ais.log_px_se.square()).sum().sqrt() / n
    khat = importance.khat
    above = khat > KHAT_UNRELIABLE
    below = khat <= KHAT_UNRELIABLE  # NaN (not fitted) is in neither group
    return {
        "mean": diff.mean().item(),
        "se": se.item(),
        "khat_above_0.7": _group(diff[above]),
        "khat_at_most_0.7": _group(diff[below]),
        "fraction_khat_above_0.7": above.double().mean().item(),
        "correlation_with_khat": _correlation(khat, diff),
        "note": (
            "IS minus AIS log p̂(x) per datum; both are stochastic lower bounds, so "
            "IS well above AIS points at a badly tuned chain or a bug"
        ),
    }


def _group(values: torch.Tensor) -> dict:
    return {"n": len(values), "mean": values.mean().item() if len(values) else None}


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation over the data where both are finite; None if undefined."""
    keep = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[keep].double(), b[keep].double()
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def ais_warnings(summary: dict) -> list[str]:
    """The loud check on an evaluation summary: why its AIS may not be trusted."""
    out = []
    gap = summary.get("is_minus_ais")
    ais = summary.get("ais")
    if ais is not None and None in (ais["log_px"]["mean"], ais["log_px"]["se"]):
        out.append(
            "AIS gave a non-finite log p̂(x) or se for some data (a chain whose "
            "weight is NaN or -inf: a density that is NaN or -inf at the start, or "
            "step sizes that diverge). The AIS mean is not usable; look at "
            "log_px_ais in evaluation.nc for the data concerned"
        )
    elif gap is not None and None in (gap["mean"], gap["se"]):
        pass  # reported above or by the IS summary itself
    elif gap is not None and gap["mean"] > SE_LIMIT * gap["se"]:
        ais = summary["ais"]
        out.append(
            f"importance sampling's mean log p̂(x) is above AIS's by "
            f"{gap['mean']:.3f} ± {gap['se']:.3f} nats, more than {SE_LIMIT:g} se. "
            "Both are lower bounds and AIS with enough steps is the tighter, so "
            f"this AIS is badly tuned or wrong: too few steps ({ais['steps']}), "
            "step sizes that do not fit (acceptance "
            f"{_num(ais['acceptance']['mean'], '.2f')}, min "
            f"{_num(ais['acceptance']['min'], '.2f')}; "
            "the pilot aims at 0.65) or a bug in the model's log-density. Try more "
            "steps and leapfrog steps (evaluate's --ais-steps, --leapfrog; fit's "
            "--eval-ais-steps, --eval-leapfrog), and evaluate's --bdmc 100 to "
            "measure AIS's error"
        )
    sandwich = summary.get("bdmc")
    gaps = ", ".join(
        f"{_num(row['gap']['mean'])} ± {_num(row['gap']['se'])} at {row['steps']}"
        for row in (sandwich or {}).get("rows", [])
    )
    if sandwich is not None and sandwich.get("bounds_cross_at_steps"):
        out.append(
            "the BDMC upper bound lies below the lower bound by more than 3 se at "
            f"{sandwich['bounds_cross_at_steps']} steps (gap in nats: {gaps} steps). "
            "That cannot happen in expectation: the model's log-density, the "
            "simulation or the transitions are wrong"
        )
    if sandwich is not None and not sandwich["gap_shrinks_with_steps"]:
        out.append(
            f"the BDMC gap does not shrink as the steps grow (gap in nats: {gaps} "
            "steps). On simulated data the gap must fall towards 0 with more steps; "
            "when it does not, the chain is badly tuned (step sizes, too few "
            "leapfrog steps) or the transitions are wrong. Try more --leapfrog and "
            "more --bdmc-steps, and check that acceptance is not near 0 or 1"
        )
    return out


def ais_lines(summary: dict) -> list[str]:
    """The terminal rows of the AIS, IS − AIS and BDMC parts (warnings apart)."""
    rows = []
    if "ais" in summary:
        ais = summary["ais"]
        lp, acc = ais["log_px"], ais["acceptance"]
        rows += [
            f"{'log p̂_AIS(x)':<14}{_num(lp['mean']):>12}{_num(lp['se']):>10}",
            f"  AIS: {ais['steps']} steps, {ais['chains']} chains, "
            f"{ais['leapfrog']} leapfrog; acceptance {_num(acc['mean'], '.2f')} "
            f"(min {_num(acc['min'], '.2f')}); {ais['seconds']:.1f} s",
        ]
    if "is_minus_ais" in summary:
        rows += _comparison_lines(summary["is_minus_ais"])
    if "bdmc" in summary:
        rows += _bdmc_lines(summary["bdmc"])
    return rows


def _comparison_lines(d: dict) -> list[str]:
    above, below = d["khat_above_0.7"], d["khat_at_most_0.7"]
    return [
        f"{'IS − AIS':<14}{_num(d['mean']):>12}{_num(d['se']):>10}",
        f"  per datum: mean {_num(above['mean'])} where k̂ > 0.7 ({above['n']} data, "
        f"{100 * d['fraction_khat_above_0.7']:.1f}%), {_num(below['mean'])} where "
        f"k̂ ≤ 0.7; corr(k̂, IS − AIS) {_num(d['correlation_with_khat'], '.2f')}",
    ]


def _bdmc_lines(b: dict) -> list[str]:
    rows = [
        f"BDMC on {b['n']} data simulated from the model ({b['chains']} chains, "
        f"{b['leapfrog']} leapfrog): log p(x) lies between the bounds",
        f"{'steps':>7}{'lower':>11}{'± se':>8}{'upper':>11}{'± se':>8}"
        f"{'gap':>9}{'± se':>8}{'accept':>8}{'s':>7}",
    ]
    for r in b["rows"]:
        lo, up, gap = r["lower"], r["upper"], r["gap"]
        rows.append(
            f"{r['steps']:>7}{_num(lo['mean']):>11}{_num(lo['se']):>8}"
            f"{_num(up['mean']):>11}{_num(up['se']):>8}{_num(gap['mean']):>9}"
            f"{_num(gap['se']):>8}{_num(r['acceptance'], '.2f'):>8}"
            f"{r['seconds']:7.1f}"
        )
    return rows


def _num(value: float | None, spec: str = ".3f") -> str:
    """A number as ``spec``, or n/a (None: undefined, e.g. no transition to accept)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:{spec}}"
