"""An evaluation's per-datum estimates on one process, or sharded over several.

``python -m pyro_vae.evaluate RUN_DIR --devices N`` runs on the processes ``torchrun``
starts: each scores its contiguous shard of the data by AIS and by importance
sampling, and rank 0 gets the merged per-datum results
(:func:`pyro_vae.cli.sharding.sharded`). A datum's draws depend only on the seed and
its global index, so the numbers equal a one-process run's:

* importance sampling's shards are multiples of ``data_chunk``, so each holds whole
  data chunks of the one-process run, and every process uses the particle chunk
  rank 0 planned (on CUDA the plan follows free memory, which differs between
  devices, and the draws may follow the particle chunk);
* AIS draws per datum, so any shards do.

What the files need beyond these (the check against Pyro's ``Trace_ELBO``, the latent
diagnostics, the posterior draws, BDMC) runs on rank 0 alone, on all the data, after
the gather (:func:`pyro_vae.cli.evaluation.write_evaluation`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import torch

from pyro_vae.cli.evaluation_ais import METHODS, AISOptions, Estimates, run_ais
from pyro_vae.cli.sharding import sharded
from pyro_vae.errors import ConfigError
from pyro_vae.evaluate.ais import AISResult
from pyro_vae.evaluate.marginal import (
    LogMarginal,
    default_budget,
    log_marginal,
    plan_particle_chunk,
)
from pyro_vae.training.distributed import DistContext

__all__ = ["DATA_CHUNK", "estimate_sharded", "particle_chunk"]

#: importance sampling's data per pass (``--data-chunk``), as ``log_marginal``'s
DATA_CHUNK = 100

R = TypeVar("R", LogMarginal, AISResult)


def estimate_sharded(
    ctx: DistContext | None,
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *,
    method: str,
    k: int,
    seed: int,
    options: AISOptions = AISOptions(),  # noqa: B008 - frozen, never mutated
    data_chunk: int = DATA_CHUNK,
) -> Estimates | None:
    """log p̂(x) per datum of all of ``x`` by ``method``, each process its shard.

    Args:
        ctx: this process's place in the group; None computes everything here.
        model, guide: the run's parts, on this process's device.
        x: all the data, the same on every process.
        method: ``"is"``, ``"ais"`` or ``"both"``.
        k: K, importance samples per datum.
        seed: the seed of the draws, the same on every process.
        options: the AIS settings.
        data_chunk: importance sampling's data per pass; shard boundaries are
            multiples of it.

    Returns:
        The estimates of all of ``x`` on rank 0 (or with ``ctx`` None), their
        ``chunks`` recording ``"processes"``; None on the other processes.

    Raises:
        DistributedError: when another process failed, died or hung.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if data_chunk < 1:
        raise ConfigError(f"data_chunk must be >= 1, got {data_chunk}")
    ais = importance = None
    if method != "is":  # first: a discrete latent is refused before the long IS

        def ais_shard(lo: int, hi: int) -> AISResult:
            return run_ais(model, guide, x[lo:hi], options, seed=seed, index_offset=lo)

        ais = _counted(ctx, sharded(ctx, ais_shard, len(x)))
    if method != "ais":

        def plan() -> int:
            return particle_chunk(x, k, data_chunk)

        # rank 0's plan on every process: on CUDA it follows the free memory
        chunk = plan() if ctx is None else ctx.main_only(plan, "planning particles")

        def is_shard(lo: int, hi: int) -> LogMarginal:
            return log_marginal(
                model,
                guide,
                x[lo:hi],
                k,
                data_chunk=data_chunk,
                particle_chunk=chunk,
                seed=seed,
                index_offset=lo,
            )

        importance = _counted(ctx, sharded(ctx, is_shard, len(x), align=data_chunk))
    if ctx is not None and not ctx.is_main:
        return None
    return Estimates(importance, ais)


def particle_chunk(x: torch.Tensor, k: int, data_chunk: int = DATA_CHUNK) -> int:
    """The particles per pass ``log_marginal`` plans for all of ``x`` on its device."""
    n_chunk = min(data_chunk, len(x))
    return plan_particle_chunk(
        k, n_chunk, x.shape[1], default_budget(x.device), x.element_size()
    )


def _counted(ctx: DistContext | None, result: R | None) -> R | None:
    """A one-process result records ``"processes": 1`` as a merged one records W."""
    if ctx is not None or result is None:
        return result
    return dataclasses.replace(result, chunks={**result.chunks, "processes": 1})
