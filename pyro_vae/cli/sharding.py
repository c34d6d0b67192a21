"""Sharded evaluation: each process scores a contiguous shard, rank 0 gets them all.

``python -m pyro_vae.evaluate RUN_DIR --devices N`` runs on ``N`` processes (per
node) started by ``torchrun``. Process ``r`` computes the per-datum results of its
shard ``[lo, hi)`` of the data (:func:`shard_bounds`), the results reach rank 0
(:func:`gather_results`) and are concatenated in rank order (:func:`merge_results`);
:func:`sharded` does the three for one process.

**The same numbers as one process.** A datum's draws depend only on the seed and its
global index: :func:`~pyro_vae.evaluate.ais.ais_log_marginal` per datum, and
:func:`~pyro_vae.evaluate.marginal.log_marginal` per data chunk, seeded from the
global index of its first datum (``index_offset=lo``). Shard boundaries are
multiples of ``align``, the data chunk of importance sampling, so each shard holds
whole data chunks of the one-process run, and the merged per-datum results equal it
(up to the last bits of floating point where a device's kernels depend on the batch
size). The seed must be fixed (not None), the same on every process.

**Waiting and failures.** The processes meet once, after their shards, in gloo's
``monitored_barrier`` (the host group on CUDA), which waits up to ``wait`` (default
:data:`SHARD_WAIT`, a week): a shard of AIS may take hours, and the fastest
processes wait for the slowest. A process that dies is noticed at once (its
connection closes), one that hangs after ``wait``; both become a
:class:`~pyro_vae.training.distributed.DistributedError` naming it. A process whose
own computation raises sends a note instead of its results: it raises its error, and
rank 0 raises a ``DistributedError`` naming that process and its error.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pyro_vae.evaluate.ais import AISResult
from pyro_vae.evaluate.marginal import LogMarginal
from pyro_vae.training.distributed import DistContext, DistributedError

__all__ = [
    "SHARD_WAIT",
    "gather_results",
    "merge_ais",
    "merge_log_marginal",
    "merge_results",
    "shard_bounds",
    "sharded",
]

R = TypeVar("R")

#: how long a process waits for the others to finish their shards
SHARD_WAIT = datetime.timedelta(days=7)


def shard_bounds(n: int, rank: int, world: int, align: int = 1) -> tuple[int, int]:
    """Process ``rank``'s contiguous shard ``[lo, hi)`` of ``range(n)``.

    Boundary ``r`` of the ``world + 1`` is the multiple of ``align`` nearest to
    ``r * n / world`` (the last is ``n``), so the shards cover ``range(n)`` once, in
    rank order, each starts at a multiple of ``align``, and each is within ``align``
    of an even share. A process may get an empty shard (``lo == hi``) when ``n`` is
    small against ``world * align``.

    Raises:
        ValueError: for a negative ``n``, a ``world`` or ``align`` below 1, or a rank
            outside ``0 .. world - 1``.
    """
    if n < 0 or world < 1 or align < 1:
        raise ValueError(
            f"shard_bounds needs n >= 0, world >= 1 and align >= 1, got n={n}, "
            f"world={world}, align={align}"
        )
    if not 0 <= rank < world:
        raise ValueError(
            f"rank {rank} is not one of the {world} processes 0..{world - 1}"
        )

    def boundary(r: int) -> int:
        if r == world:
            return n
        # the multiple of align nearest to r * n / world (halves round up)
        return min(n, align * ((2 * r * n + world * align) // (2 * world * align)))

    return boundary(rank), boundary(rank + 1)


@dataclasses.dataclass(frozen=True)
class _Failure:
    """Sent in place of a shard's results when its computation raised."""

    rank: int
    lo: int
    hi: int
    error: str


def gather_results(
    ctx: DistContext, result: Any, *, wait: datetime.timedelta | None = None
) -> list[Any] | None:
    """Every process's ``result`` on rank 0, in rank order; None on the others.

    Call it on every process, each with its own result (a :class:`LogMarginal`, an
    :class:`AISResult`, or None for an empty shard). Tensors are moved to the CPU
    first and travel pickled over gloo (the host group when the backend is nccl).
    The processes first wait for each other up to ``wait`` (default
    :data:`SHARD_WAIT`; see the module docstring).

    Raises:
        DistributedError: when another process died, or did not arrive in time.
    """
    result = _on_cpu(result)
    timeout = SHARD_WAIT if wait is None else wait
    with ctx.guard("waiting for the other processes to finish their shards"):
        dist.monitored_barrier(
            group=ctx.host_group, timeout=timeout, wait_all_ranks=True
        )
    parts: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    with ctx.guard("gathering the shards' results on rank 0"):
        dist.gather_object(result, parts, dst=0, group=ctx.host_group)
    return parts


def sharded(
    ctx: DistContext | None,
    compute: Callable[[int, int], R],
    n: int,
    align: int = 1,
    *,
    merge: Callable[[Sequence[R | None]], R] | None = None,
    wait: datetime.timedelta | None = None,
) -> R | None:
    """Compute this process's shard of ``range(n)``; the merged result on rank 0.

    Args:
        ctx: this process's place in the group; None runs ``compute(0, n)`` alone.
        compute: ``compute(lo, hi)`` returns the per-datum results of data
            ``lo .. hi - 1``, e.g. ``log_marginal(model, guide, x[lo:hi], k,
            data_chunk=align, seed=seed, index_offset=lo)``. It is not called for
            an empty shard.
        n: the number of data.
        align: shard boundaries are multiples of it: ``data_chunk`` for
            :func:`~pyro_vae.evaluate.marginal.log_marginal` (any value suits AIS).
        merge: joins the parts in rank order (None for an empty shard); by default
            :func:`merge_results`.
        wait: how long to wait for the other processes (default :data:`SHARD_WAIT`).

    Returns:
        On rank 0 (or with ``ctx`` None) the results of all ``n`` data; None on the
        other processes.

    Raises:
        DistributedError: on rank 0 when another process's ``compute`` raised, and
            on any process when another died or hung. A process's own error from
            ``compute`` is raised as it is, after the others have been told.
    """
    if ctx is None:
        return compute(0, n)
    lo, hi = shard_bounds(n, ctx.rank, ctx.world_size, align)
    result: Any = None
    error: Exception | None = None
    if hi > lo:
        try:
            result = compute(lo, hi)
        except Exception as err:  # noqa: BLE001 - re-raised below, after telling
            error = err
            result = _Failure(ctx.rank, lo, hi, f"{type(err).__name__}: {err}")
    parts = gather_results(ctx, result, wait=wait)
    if error is not None:
        raise error
    if parts is None:
        return None
    failed = [p for p in parts if isinstance(p, _Failure)]
    if failed:
        raise DistributedError(
            "; ".join(
                f"rank {f.rank} of {ctx.world_size} failed on its shard (data {f.lo} "
                f"to {f.hi - 1}): {f.error}"
                for f in failed
            )
            + " (that process's own message above says more)"
        )
    return (merge or merge_results)(parts)


def merge_results(parts: Sequence[Any]) -> Any:
    """:func:`merge_log_marginal` or :func:`merge_ais`, by the type of the parts."""
    present = [p for p in parts if p is not None]
    if present and all(isinstance(p, LogMarginal) for p in present):
        return merge_log_marginal(parts)
    if present and all(isinstance(p, AISResult) for p in present):
        return merge_ais(parts)
    kinds = sorted({type(p).__name__ for p in present}) or ["nothing"]
    raise TypeError(
        f"merge_results joins LogMarginal or AISResult parts, got {', '.join(kinds)};"
        " pass sharded(..., merge=...) for other results"
    )


def merge_log_marginal(parts: Sequence[LogMarginal | None]) -> LogMarginal:
    """One :class:`LogMarginal` from the shards' results, in rank order.

    Args:
        parts: one per process in rank order, None for a process with an empty
            shard.

    Returns:
        Per-datum fields concatenated; ``seconds`` the longest process's (the wall
        time); ``chunks`` the first shard's, with ``"processes": len(parts)``.
    """
    present = _present(parts, LogMarginal)
    first = present[0]
    for part in present[1:]:
        if part.k != first.k or sorted(part.iwae) != sorted(first.iwae):
            raise ValueError(
                f"the shards used different K ({first.k}, {part.k}) or IWAE grids; "
                "every process must run log_marginal with the same k"
            )

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in present])

    return LogMarginal(
        k=first.k,
        log_px=cat("log_px"),
        log_px_se=cat("log_px_se"),
        elbo=cat("elbo"),
        elbo_se=cat("elbo_se"),
        gap_se=cat("gap_se"),
        iwae={g: torch.cat([p.iwae[g] for p in present]) for g in first.iwae},
        iwae_se={g: torch.cat([p.iwae_se[g] for p in present]) for g in first.iwae},
        khat=cat("khat"),
        ess=cat("ess"),
        seconds=max(p.seconds for p in present),
        chunks={**first.chunks, "processes": len(parts)},
    )


def merge_ais(parts: Sequence[AISResult | None]) -> AISResult:
    """One :class:`AISResult` from the shards' results, in rank order.

    Args:
        parts: one per process in rank order, None for a process with an empty
            shard.

    Returns:
        ``log_px``, ``log_px_se`` and ``acceptance`` concatenated on dim 0,
        ``log_weights`` (chains, N) on dim 1, ``step_sizes`` (bins, chains, N) on
        dim 2; ``seconds`` the longest process's; ``chunks`` the first shard's,
        with ``"processes": len(parts)``.
    """
    present = _present(parts, AISResult)
    first = present[0]
    for part in present[1:]:
        if part.settings() != first.settings():
            raise ValueError(
                f"the shards ran AIS with different settings ({first.settings()} "
                f"and {part.settings()}); every process must use the same ones"
            )
    return dataclasses.replace(
        first,
        log_px=torch.cat([p.log_px for p in present]),
        log_px_se=torch.cat([p.log_px_se for p in present]),
        log_weights=torch.cat([p.log_weights for p in present], dim=1),
        acceptance=torch.cat([p.acceptance for p in present]),
        step_sizes=torch.cat([p.step_sizes for p in present], dim=2),
        seconds=max(p.seconds for p in present),
        chunks={**first.chunks, "processes": len(parts)},
    )


def _present(parts: Sequence[Any], kind: type) -> list[Any]:
    """The parts that are not None, all of type ``kind``; at least one."""
    present = [p for p in parts if p is not None]
    if not present:
        raise ValueError(
            f"no results to merge: all {len(parts)} shards were empty (is there data?)"
        )
    wrong = sorted({type(p).__name__ for p in present if not isinstance(p, kind)})
    if wrong:
        raise TypeError(f"expected {kind.__name__} parts, got {', '.join(wrong)}")
    return present


def _on_cpu(result: Any) -> Any:
    """A result dataclass with its tensors (and dicts of tensors) on the CPU."""
    if result is None or not dataclasses.is_dataclass(result):
        return result
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            changes[f.name] = value.cpu()
        elif isinstance(value, dict) and any(
            isinstance(v, torch.Tensor) and v.device.type != "cpu"
            for v in value.values()
        ):
            changes[f.name] = {
                k: v.cpu() if isinstance(v, torch.Tensor) else v
                for k, v in value.items()
            }
    return dataclasses.replace(result, **changes) if changes else result
