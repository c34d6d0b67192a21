r"""Bidirectional Monte Carlo: a sandwich that measures the error of AIS.

On data simulated from the model, (x, z) ~ p(z) p(x | z), the latent z is an exact
draw of p(z | x). Then (Grosse, Ghahramani & Adams, 2015):

* forward AIS from the start distribution to p(z | x) gives
  :math:`\log \hat p_{\rm fwd}(x) = \log \frac1C \sum_c w_c`, with
  :math:`E[\log \hat p_{\rm fwd}] \le \log p(x)`;
* reverse AIS, started at the exact z and annealed from β = 1 back to 0 with the same
  transitions, has weights with :math:`E[w^{\rm rev}_c] = 1 / p(x)`, so
  :math:`\log \hat p_{\rm rev}(x) = -\log \frac1C \sum_c w^{\rm rev}_c` has
  :math:`E[\log \hat p_{\rm rev}] \ge \log p(x)`.

The gap :math:`\log \hat p_{\rm rev} - \log \hat p_{\rm fwd}` bounds, in expectation,
how far forward AIS with these settings is from log p(x) on data like these (Wu et
al., 2017, use it for VAEs). Each datum's C reverse chains start from its one exact
z. The standard error of the mean gap (and of each mean bound) is the sd of the
per-datum values over sqrt(n), which counts the exact z's randomness too; a row's
per-datum ``upper_se`` is the delta-method se over chains that share one z, so it
is conditional on that z.

Both directions use the step sizes of the forward pilot pass (the same frozen
schedule, read at the same positions along it).

References:
    Grosse, Ghahramani & Adams (2015), Sandwiching the marginal likelihood using
    bidirectional Monte Carlo, arXiv:1511.02543.
    Wu, Burda, Salakhutdinov & Grosse (2017), On the quantitative analysis of
    decoder-based generative models, ICLR.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine

from pyro_vae.errors import ConfigError
from pyro_vae.evaluate.ais import (
    ESTIMATE,
    PILOT,
    _eval_mode,
    _Target,
    ais_settings_check,
    log_mean_exp_se,
)
from pyro_vae.evaluate.annealing import Noise, anneal, betas, pilot_step_sizes
from pyro_vae.rng import datum_keys, forked_rng

__all__ = ["BDMCResult", "BDMCRow", "bdmc", "simulate"]

PILOT_STREAM = 16  # row r's pilot and reverse passes draw from streams 16 + 2r, + 1


def _model_device(model: Callable) -> torch.device:
    """The device of the model's first parameter or buffer; the CPU if it has none."""
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


@dataclass(frozen=True)
class BDMCRow:
    """Per-datum bounds ``(n,)`` at one number of steps, float64 on the CPU."""

    steps: int
    lower: torch.Tensor
    upper: torch.Tensor
    lower_se: torch.Tensor
    upper_se: torch.Tensor
    acceptance: torch.Tensor
    seconds: float

    @property
    def gap(self) -> torch.Tensor:
        return self.upper - self.lower

    def summary(self) -> dict:
        n = len(self.gap)

        def mean_se(v: torch.Tensor) -> dict[str, float]:
            se = v.std().item() / math.sqrt(n) if n > 1 else math.nan
            return {"mean": v.mean().item(), "se": se}

        return {
            "steps": self.steps,
            "lower": mean_se(self.lower),
            "upper": mean_se(self.upper),
            "gap": mean_se(self.gap),
            "acceptance": self.acceptance.mean().item(),
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class BDMCResult:
    """The sandwich at every number of steps asked for, on the same simulated data."""

    n: int
    chains: int
    leapfrog: int
    schedule: str
    start: str
    rows: list[BDMCRow]

    def shrinks(self) -> bool:
        """True when the mean gap falls (within 2 se) as steps grow."""
        out = True
        for a, b in zip(self.rows, self.rows[1:], strict=False):
            sa, sb = a.summary()["gap"], b.summary()["gap"]
            tolerance = 2 * math.hypot(_finite(sa["se"]), _finite(sb["se"]))
            out &= sb["mean"] <= sa["mean"] + tolerance
        return bool(out)

    def crossed(self) -> list[int]:
        """Steps at which the upper bound lies below the lower by more than 3 se:
        impossible in expectation, so a bug (or a wrong model density)."""
        rows = [r.summary()["gap"] for r in self.rows]
        return [
            r.steps
            for r, gap in zip(self.rows, rows, strict=True)
            if gap["mean"] < -3 * _finite(gap["se"])
        ]

    def summary(self) -> dict:
        return {
            "n": self.n,
            "chains": self.chains,
            "leapfrog": self.leapfrog,
            "schedule": self.schedule,
            "start": self.start,
            "data": "simulated from the model: z ~ p(z), x ~ p(x | z)",
            "rows": [row.summary() for row in self.rows],
            "gap_shrinks_with_steps": self.shrinks(),
            "bounds_cross_at_steps": self.crossed(),
        }


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


@torch.no_grad()
def simulate(
    model: Callable, n: int, latents: Sequence[str], seed: int, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n draws (x, z) of the model: ``model(n=n)`` traced; x from its site ``"x"``."""
    anchor = torch.empty(0, device=device)
    with forked_rng(anchor), _eval_mode(model):
        torch.manual_seed(seed)
        trace = poutine.trace(model).get_trace(n=n)
    if "x" not in trace.nodes:
        raise ConfigError("BDMC needs a model whose data site is named 'x'")
    return trace.nodes["x"]["value"], {k: trace.nodes[k]["value"] for k in latents}


def bdmc(
    model: Callable,
    guide: Callable | None,
    n: int,
    *,
    steps: Sequence[int] = (100, 1000),
    chains: int = 16,
    leapfrog: int = 10,
    schedule: str = "sigmoid",
    start: str = "guide",
    pilot_steps: int | None = None,
    step_size: float = 0.05,
    target_accept: float = 0.65,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> BDMCResult:
    """The BDMC gap of AIS on ``n`` data simulated from the model, for each steps.

    Arguments as for :func:`~pyro_vae.evaluate.ais.ais_log_marginal`; ``steps`` is a
    list (run in increasing order), each at least 2 (one step has no transition to
    test). ``device``: where the simulated data live; by default the model's.
    """
    steps = sorted({int(s) for s in steps})  # the gap must shrink along this order
    if not steps or min(steps) < 2:
        raise ConfigError(f"BDMC steps must each be >= 2, got {steps}")
    if int(n) < 2:
        raise ConfigError(f"BDMC needs n >= 2 simulated data for a se, got {n}")
    if pilot_steps is not None and pilot_steps < 1:
        raise ConfigError(f"pilot_steps must be >= 1, got {pilot_steps}")
    for s in steps:
        ais_settings_check(chains, leapfrog, start, guide, target_accept, s)
    betas(1, schedule)
    device = _model_device(model) if device is None else torch.device(device)
    target = _Target(model, guide, start)
    probe, _ = simulate(model, 2, [], seed, device)
    target.validate(probe)
    x, z = simulate(model, n, target.layout.names, seed, device)
    index = torch.arange(n, device=device)
    keys = datum_keys(seed, index)
    rows = []
    with _eval_mode(model, guide), pyro.validation_enabled(False):
        densities = target.densities(x, chains)
        exact = target.layout.flatten_values(z, n).expand(chains, -1, -1)
        for row, s in enumerate(steps):
            begin = time.perf_counter()
            pilot = min(s, 200) if pilot_steps is None else pilot_steps
            sizes = pilot_step_sizes(
                densities,
                target.initial(x, chains, seed, index, stream=PILOT),
                betas(pilot, schedule),
                leapfrog,
                Noise(keys, PILOT_STREAM + 2 * row),
                initial=step_size,
                target_accept=target_accept,
                bins=max(1, min(50, pilot // 4)),
            )
            beta = betas(s, schedule)
            u0 = target.initial(x, chains, seed, index, stream=ESTIMATE)
            fwd = anneal(densities, u0, beta, sizes, leapfrog, Noise(keys, ESTIMATE))
            rev = anneal(
                densities,
                exact.clone(),
                beta,
                sizes,
                leapfrog,
                Noise(keys, PILOT_STREAM + 2 * row + 1),
                reverse=True,
            )
            lower, lower_se = log_mean_exp_se(fwd.log_weights.cpu())
            neg_upper, upper_se = log_mean_exp_se(rev.log_weights.cpu())
            acceptance = (fwd.acceptance + rev.acceptance).cpu() / 2
            rows.append(
                BDMCRow(
                    s,
                    lower,
                    -neg_upper,
                    lower_se,
                    upper_se,
                    acceptance,
                    time.perf_counter() - begin,
                )
            )
    return BDMCResult(n, chains, leapfrog, schedule, start, rows)
