"""The process group: joining it (:func:`init_from_env`) and what training needs of it.

:class:`DistContext` holds this process's rank and offers the collectives training
uses (sharding, DDP, sums, agreement, rank-0-only work), each guarded so that a lost
process becomes a :class:`~pyro_vae.training.distributed.failures.DistributedError`.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyro
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from pyro_vae.errors import ConfigError
from pyro_vae.training.distributed.failures import (
    DistributedError,
    collective_timeout,
    first_line,
    lost_contact,
)
from pyro_vae.training.distributed.launch import cpu_cores
from pyro_vae.training.distributed.replica import Replica

__all__ = ["DistContext", "init_from_env"]

T = TypeVar("T")


def init_from_env(device: torch.device, seed: int) -> DistContext:
    """Join the process group that ``torchrun``'s environment describes.

    Args:
        device: the resolved device (``cpu`` or ``cuda``); on CUDA each process takes
            ``cuda:LOCAL_RANK``.
        seed: the run's seed; the shuffles of every epoch derive from it.

    Raises:
        ConfigError: for an impossible device (``cuda:I`` with several processes,
            fewer GPUs than processes on a node, no process-group backend).
        DistributedError: when the group cannot form within the timeout.
    """
    rank, world, local_rank, local_world = _ranks_from_env()
    device, backend = _device_and_backend(device, local_rank, local_world)
    if not _backend_available(backend):
        raise ConfigError(f"this torch build has no {backend} process-group backend")
    table, host = _join_group(backend, rank, world)
    return DistContext(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        device=device,
        backend=backend,
        seed=seed,
        processes=[tuple(entry) for entry in table],
        host_group=host,
    )


def _ranks_from_env() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from torchrun's variables."""
    env = os.environ
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except (KeyError, ValueError) as err:
        raise ConfigError(
            f"RANK and WORLD_SIZE must be integers set by torchrun ({err})"
        ) from None
    return rank, world, local_rank, local_world


def _device_and_backend(
    device: torch.device, local_rank: int, local_world: int
) -> tuple[torch.device, str]:
    """This process's device (``cuda:LOCAL_RANK`` on CUDA) and its backend."""
    if device.type == "cuda":
        if device.index is not None and local_world > 1:
            raise ConfigError(
                f"--device {device} names one GPU, but {local_world} processes run "
                "on this node; use --device cuda (each process takes cuda:LOCAL_RANK)"
            )
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"{local_world} processes on this node but only "
                f"{torch.cuda.device_count()} CUDA devices; lower --devices"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device, "nccl"
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, cpu_cores() // local_world))
    return device, "gloo"


def _join_group(backend: str, rank: int, world: int) -> tuple[list[Any], Any]:
    """Join the process group; every process's (host, pid), and a gloo group for it."""
    env = os.environ
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=collective_timeout()
        )
        host = dist.new_group(backend="gloo") if backend != "gloo" else None
        table: list[Any] = [None] * world
        dist.all_gather_object(table, (socket.gethostname(), os.getpid()), group=host)
    except RuntimeError as err:
        raise DistributedError(
            f"process {rank} of {world} could not join the process group at "
            f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')} "
            f"({first_line(err)}); check MASTER_ADDR/MASTER_PORT and that every "
            "process was started"
        ) from None
    return table, host


@dataclass
class DistContext:
    """This process's place in the group, and the collectives training needs.

    ``rank`` 0 is the main process: it alone writes the run directory. Build one with
    :func:`init_from_env`; :func:`pyro_vae.training.loop.train` takes it as
    ``distributed``.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    seed: int = 0
    processes: list[tuple[str, int]] = field(default_factory=list)
    host_group: Any = None  # a gloo group for Python objects when backend is nccl
    _replica: Replica | None = field(default=None, repr=False)
    _ddp: DistributedDataParallel | None = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: writes files, checkpoints and reports."""
        return self.rank == 0

    # -- data ---------------------------------------------------------------------

    def local_batch_size(self, batch_size: int) -> int:
        """``batch_size // world_size``; the global batch must divide evenly."""
        world = self.world_size
        if batch_size % world:
            near = max(world, batch_size // world * world)
            raise ConfigError(
                f"--batch-size {batch_size} is the global batch and must divide by "
                f"the {world} processes; use a multiple of {world}, e.g. {near}"
            )
        return batch_size // self.world_size

    def shard_order(self, n: int, epoch: int) -> torch.Tensor:
        """This process's indices of ``range(n)`` for ``epoch``, in training order.

        One permutation per epoch from ``seed + epoch``, the same on every process,
        dealt out by :class:`DistributedSampler` (see
        :mod:`pyro_vae.training.distributed`).
        """
        sampler = DistributedSampler(
            range(n),
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=self.seed,
            drop_last=False,
        )
        sampler.set_epoch(epoch)
        return torch.as_tensor(list(sampler), dtype=torch.long, device=self.device)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This process's contiguous part of ``x`` (sizes differ by one at most)."""
        return x.tensor_split(self.world_size)[self.rank]

    # -- training -----------------------------------------------------------------

    def data_parallel(
        self,
        step_loss: Callable[[torch.Tensor], torch.Tensor],
        loss_fn: torch.nn.Module,
        should_stop: Callable[[], bool] | None = None,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``step_loss`` wrapped in DDP: its ``backward()`` averages the gradients.

        Args:
            step_loss: the batch loss, e.g. :class:`pyro_vae.training.step.StepLoss`.
            loss_fn: the module whose parameters ``step_loss`` trains.
            should_stop: polled once per step; its answer is shared with the
                gradients (see :meth:`agree`).
        """
        replica = Replica(step_loss, loss_fn, should_stop, self.device)
        # static_graph: the same parameters take part in every step, and those that
        # never do (e.g. a learned prior under --loss ae) are handled without the
        # per-step graph walk of find_unused_parameters
        options: dict[str, Any] = {"static_graph": True}
        accepted = inspect.signature(DistributedDataParallel.__init__).parameters
        # buffers are constants here: sync them once, not before every forward
        if "forward_sync_buffers" in accepted:
            options["forward_sync_buffers"] = False
        else:  # older torch
            options["broadcast_buffers"] = False
        if self.device.type == "cuda":
            options["device_ids"] = [self.device.index]
        with self.guard("setting up DistributedDataParallel"):
            wrapped = DistributedDataParallel(replica, **options)
        self._replica, self._ddp = replica, wrapped
        return wrapped

    def agree(self) -> tuple[bool, bool]:
        """After ``backward()``: (every loss since the last call finite, stop asked).

        Reads the two flag gradients DDP has just averaged; the same answer on every
        process. Reading syncs a CUDA device, so call it every step on CPU only.
        """
        replica = self._replica
        if replica is None or replica.flags.grad is None:
            return True, False
        grad = replica.flags.grad.detach().cpu()
        replica.flags.grad = None
        return bool(torch.isfinite(grad[0])), bool(grad[1] > 0)

    def all_sum(self, *values: torch.Tensor | float) -> list[float]:
        """Sum each value over the processes (one collective); floats back."""
        local = torch.stack(
            [torch.as_tensor(v).detach().to(self.device, torch.float64) for v in values]
        )
        with self.guard("summing training statistics"):
            dist.all_reduce(local)
        return local.tolist()

    def check_in_sync(self, module: torch.nn.Module, epoch: int) -> None:
        """Raise unless every process holds bitwise the same parameters."""
        digest = hashlib.sha1()
        for p in module.parameters():
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        digests: list[Any] = [None] * self.world_size
        with self.guard("comparing parameters"):
            dist.all_gather_object(digests, digest.hexdigest(), group=self.host_group)
        if len(set(digests)) > 1:
            groups = {d: [r for r, e in enumerate(digests) if e == d] for d in digests}
            raise DistributedError(
                f"after epoch {epoch} the processes hold different parameters "
                f"(ranks grouped by parameters: {sorted(groups.values())}); gradients "
                "were not averaged the same everywhere. Please report it."
            )

    def seed_rngs(self, seed: int, start_epoch: int) -> None:
        """Seed torch, numpy and python per process from (seed, rank, start_epoch)."""
        state = np.random.SeedSequence([seed, self.rank, start_epoch])
        pyro.set_rng_seed(int(state.generate_state(1)[0]))

    # -- coordination ---------------------------------------------------------------

    def main_only(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on rank 0 only; every process gets its result.

        If it fails (a :class:`PyroVAEError`, or any other error such as an
        ``OSError`` writing the run directory), rank 0 raises that error and the
        others raise :class:`DistributedError` pointing at it, instead of waiting
        for the collective timeout.
        """
        box: list[Any] = [None, None]
        error: Exception | None = None
        if self.is_main:
            try:
                box[0] = fn()
            except Exception as err:  # noqa: BLE001 - re-raised below, after telling
                error, box[1] = err, f"{type(err).__name__}: {err}"
        with self.guard(what):
            dist.broadcast_object_list(box, src=0, group=self.host_group)
        if error is not None:
            raise error
        if box[1] is not None:
            raise DistributedError(f"rank 0 stopped while {what}: {box[1]}")
        return box[0]

    def barrier(self, what: str = "waiting for the other processes") -> None:
        """Wait until every process gets here."""
        with self.guard(what):
            dist.barrier(group=self.host_group)

    def close(self) -> None:
        """Leave the process group (safe to call twice, or after a failure)."""
        # DDP's reducer holds the group; were it freed after the group, at exit (it
        # sits in a reference cycle, or in a traceback's frames), the process could
        # abort ("terminate called without an active exception").
        wrapped, self._ddp, self._replica = self._ddp, None, None
        if wrapped is not None:
            for name in ("logger", "reducer"):
                wrapped.__dict__.pop(name, None)
            del wrapped
        gc.collect()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - leaving; a broken group is expected here
                pass

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """A collective's failure inside the block becomes :class:`DistributedError`."""
        try:
            yield
        except RuntimeError as err:
            lost = self.lost_contact(err, what)
            if lost is None:
                raise
            raise lost from None

    def lost_contact(self, err: BaseException, what: str) -> DistributedError | None:
        """The :class:`DistributedError` that ``err`` means, or None if it is no
        collective's failure
        (:func:`pyro_vae.training.distributed.failures.lost_contact`)."""
        return lost_contact(err, what, self.rank, self.world_size, self.processes)


def _backend_available(backend: str) -> bool:
    if not dist.is_available():
        return False
    check = getattr(dist, "is_backend_available", None)  # torch >= 2.1
    if check is not None:
        return bool(check(backend))
    return bool(getattr(dist, f"is_{backend}_available")())
