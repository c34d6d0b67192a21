r"""Data-parallel training on several processes: ``torchrun`` + DistributedDataParallel.

One model trains on ``W`` processes (``--devices N`` per node times ``--num-nodes M``),
each with its own shard of every epoch. Everything here ships with torch: the processes
are started by ``torchrun`` (``python -m torch.distributed.run``), which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``; they meet in a process group (``gloo`` on CPU, ``nccl`` on CUDA), and
:class:`torch.nn.parallel.DistributedDataParallel` averages the gradients. The Pyro
model and guide are plain ``nn.Module`` s (``module_local_params``), so DDP wraps them
as they are.

**Sharding.** Every epoch, :class:`torch.utils.data.DistributedSampler` draws one
permutation of the training indices from ``seed + epoch`` (the same on every process)
and deals it out: process ``r`` takes positions ``r, r + W, r + 2W, ...``. Local batch
``k`` of all processes together is then global batch ``k`` of that permutation, and
``--batch-size B`` stays the *global* batch: each process takes ``b = B / W`` data per
step (``B`` must divide by ``W``). When ``W`` does not divide ``N``, the sampler repeats
the first ``W - 1`` indices at most, so that every process takes the same number of
steps. Validation: each process scores a contiguous shard of the validation split and
the sums are added.

**Scaling rule.** With per-datum loss :math:`\ell(x) = -\mathrm{ELBO}(x)`, the full-data
objective is :math:`L = \sum_{n=1}^{N} \ell(x_n)`. The model's ``pyro.plate("data",
x.shape[0])`` has no subsampling scale, so process ``r``'s Pyro loss is
:math:`\sum_{x \in B_r} \hat\ell(x)` over its local batch :math:`B_r` of size ``b``,
and :func:`pyro_vae.train.train` divides it by ``b``. DDP averages the gradients over
the ``W`` processes:

.. math::
    g = \frac{1}{W} \sum_{r=1}^{W} \frac{1}{b} \sum_{x \in B_r} \nabla \hat\ell(x)
      = \frac{1}{B} \sum_{x \in B} \nabla \hat\ell(x), \qquad B = \bigcup_r B_r,

the gradient of the mean per-datum loss over the global batch, exactly what one process
computes on the same ``B`` data. Since ``B`` is a uniformly random subset of the data,
:math:`E[N g] = \nabla L`: ``N`` times it is an unbiased estimate of the full-data
(negative) ELBO gradient, and training with ``W`` processes is the same stochastic
optimization as with one at the same global batch, so the learning rate stays as it is
(no "linear scaling" of Goyal et al., 2017, which applies when the global batch grows
with ``W``). References: P. Goyal et al., *Accurate, Large Minibatch SGD: Training
ImageNet in 1 Hour*, arXiv:1706.02677 (2017), section 2; S. Li et al., *PyTorch
Distributed: Experiences on Accelerating Data Parallel Training*, VLDB 13(12) (2020).
InfoVAE's MMD(q(z), p(z)) is estimated from each process's local batch (``b`` codes
against ``b`` prior draws), so its estimate is noisier than one from the global batch.

**Randomness.** All processes seed with ``--seed`` and build identical networks (DDP
also broadcasts rank 0's weights once); after that each process re-seeds its own
generators from ``(seed, rank, start_epoch)``, so that the z draws and the dynamic
binarizations of different processes are independent.

**Agreement without extra round trips.** The module DDP wraps carries two extra
scalars whose gradients are the step's loss and a stop request; DDP averages them with
the real gradients, so after ``backward()`` every process knows, at no extra
collective, whether any process saw a non-finite loss (then no process takes the step)
or caught SIGINT/SIGTERM (then all stop after the same step). On CUDA they are read
every :data:`pyro_vae.train.SYNC_EVERY` steps, as the single-process loop checks.

**Failures.** Every collective has a timeout (:func:`collective_timeout`, default
:data:`DEFAULT_TIMEOUT_S` seconds, ``PYRO_VAE_DIST_TIMEOUT`` overrides it). A process
that dies or hangs makes the others fail with :class:`DistributedError`, which names
the processes found gone and how to resume; checkpoints are written by rank 0 only,
atomically (:mod:`pyro_vae.checkpoint`).

This module imports neither :mod:`pyro_vae.models` nor :mod:`pyro_vae.guides`.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyro
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from pyro_vae.errors import ConfigError, PyroVAEError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistContext",
    "DistributedError",
    "collective_timeout",
    "cpu_cores",
    "init_from_env",
    "launch",
    "launch_command",
    "launched",
    "needs_launch",
]

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 300.0  # a collective that waits longer than this fails
TIMEOUT_ENV = "PYRO_VAE_DIST_TIMEOUT"
#: words in the messages of torch's collectives when a peer is gone or too slow
_COLLECTIVE_FAILURE = (
    "gloo",
    "nccl",
    "connection closed",
    "connection reset",
    "broken pipe",
    "timed out",
    "timeout",
    "processgroup",
    "c10d",
)


class DistributedError(PyroVAEError):
    """A collective failed: another process died, hung, or stopped during set-up."""


def launched() -> bool:
    """True inside a process that ``torchrun`` (or another launcher) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_launch(devices: int, num_nodes: int) -> bool:
    """More than one process is asked for and this one is not one of them yet."""
    return devices * num_nodes > 1 and not launched()


def cpu_cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def collective_timeout() -> datetime.timedelta:
    """How long a collective may wait: ``PYRO_VAE_DIST_TIMEOUT`` seconds, or 300."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(
            f"{TIMEOUT_ENV}={text!r} is not a number of seconds"
        ) from None
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be positive, got {text}")
    return datetime.timedelta(seconds=seconds)


def launch_command(argv: Sequence[str], devices: int, num_nodes: int) -> list[str]:
    """The ``torchrun`` command running ``python -m pyro_vae.fit ARGV`` on W processes.

    One node uses ``--standalone`` (a local rendezvous on a free port). Several nodes
    use a static rendezvous: ``MASTER_ADDR``, ``MASTER_PORT`` (of node 0) and
    ``NODE_RANK`` (0 .. M-1) must be set on every node.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(devices),
        "--nnodes",
        str(num_nodes),
    ]
    if num_nodes == 1:
        cmd.append("--standalone")
    else:
        needed = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
        missing = [name for name in needed if not os.environ.get(name)]
        if missing:
            raise ConfigError(
                f"--num-nodes {num_nodes} needs {', '.join(missing)} set on every "
                "node: MASTER_ADDR and MASTER_PORT of node 0, and NODE_RANK 0.."
                f"{num_nodes - 1} (or launch torchrun yourself, see README.md)"
            )
        cmd += [
            "--node-rank",
            os.environ["NODE_RANK"],
            "--master-addr",
            os.environ["MASTER_ADDR"],
            "--master-port",
            os.environ["MASTER_PORT"],
        ]
    return [*cmd, "-m", "pyro_vae.fit", *argv]


def launch(argv: Sequence[str], devices: int, num_nodes: int) -> int:
    """Run ``python -m pyro_vae.fit ARGV`` on ``devices`` processes through torchrun.

    Each process gets ``OMP_NUM_THREADS = cores // devices`` unless it is set. This
    process waits; Ctrl-C reaches the workers directly (they stop after the current
    step and rank 0 writes a checkpoint), and SIGTERM is passed on to torchrun.

    Returns:
        torchrun's exit status (0 when every process succeeded), or 128 + the
        signal's number when a signal stopped the run (130 for SIGINT).
    """
    cmd = launch_command(argv, devices, num_nodes)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores() // devices)))
    proc = subprocess.Popen(cmd, env=env)
    caught: list[int] = []

    def note(signum: int, frame: object) -> None:
        # Ctrl-C reaches torchrun and the workers from the terminal by itself
        caught.append(signum)
        if signum != signal.SIGINT:
            proc.send_signal(signum)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, note)
    except ValueError:  # not the main thread
        pass
    try:
        status = proc.wait()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if status and caught:  # as a single process would exit: 130, 143
        return 128 + caught[0]
    return status


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
    env = os.environ
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except (KeyError, ValueError) as err:
        raise ConfigError(
            f"RANK and WORLD_SIZE must be integers set by torchrun ({err})"
        ) from None
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
        backend = "nccl"
    else:
        backend = "gloo"
        if "OMP_NUM_THREADS" not in env:
            torch.set_num_threads(max(1, cpu_cores() // local_world))
    if not _backend_available(backend):
        raise ConfigError(f"this torch build has no {backend} process-group backend")
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
            f"({_first_line(err)}); check MASTER_ADDR/MASTER_PORT and that every "
            "process was started"
        ) from None
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


@dataclass
class DistContext:
    """This process's place in the group, and the collectives training needs.

    ``rank`` 0 is the main process: it alone writes the run directory. Build one with
    :func:`init_from_env`; :func:`pyro_vae.train.train` takes it as ``distributed``.
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
    _replica: _Replica | None = field(default=None, repr=False)
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
        dealt out by :class:`DistributedSampler` (see the module docstring).
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
            step_loss: the batch loss, e.g. :class:`pyro_vae.step.StepLoss`.
            loss_fn: the module whose parameters ``step_loss`` trains.
            should_stop: polled once per step; its answer is shared with the
                gradients (see :meth:`agree`).
        """
        replica = _Replica(step_loss, loss_fn, should_stop, self.device)
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

        If it fails with a :class:`PyroVAEError`, rank 0 raises that error and the
        others raise :class:`DistributedError` pointing at it, instead of waiting.
        """
        box: list[Any] = [None, None]
        error: PyroVAEError | None = None
        if self.is_main:
            try:
                box[0] = fn()
            except PyroVAEError as err:
                error, box[1] = err, str(err)
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
        collective's failure (an ordinary bug that must surface as itself)."""
        if isinstance(err, DistributedError):
            return err
        text = str(err).lower()
        is_dist = isinstance(err, getattr(dist, "DistError", ()))
        if not (is_dist or any(word in text for word in _COLLECTIVE_FAILURE)):
            return None
        gone = self._gone()
        if gone:
            who = ", ".join(f"rank {r} (pid {pid})" for r, pid in gone)
            cause = f"{who} exited"
        elif self.world_size == 2:
            cause = f"rank {1 - self.rank} died or hung"
        else:
            cause = "another process died or hung (torchrun's summary names it)"
        return DistributedError(
            f"rank {self.rank} of {self.world_size} lost the other processes while "
            f"{what}: {cause} (the collective failed with: {_gist(err)})"
        )

    def _gone(self) -> list[tuple[int, int]]:
        """(rank, pid) of the processes on this host that have exited."""
        host = socket.gethostname()
        peers = [
            (r, pid)
            for r, (h, pid) in enumerate(self.processes)
            if h == host and r != self.rank
        ]
        deadline = time.monotonic() + 1.0  # a dying peer may take a moment to exit
        while peers:
            gone = [(r, pid) for r, pid in peers if not _alive(pid)]
            if gone or time.monotonic() > deadline:
                return gone
            time.sleep(0.1)
        return []


class _Replica(torch.nn.Module):
    """What DDP wraps: ``loss_fn``'s parameters, plus two flags that share news.

    ``forward`` returns ``loss + (flags * [loss, stop]).sum()`` with ``flags`` zero,
    so the value is the loss (for finite losses, exactly), and the gradient of
    ``flags`` is ``[loss, stop]`` times the caller's scale; DDP averages it with the
    others, so a NaN on any process, or any stop request, reaches every process.
    """

    def __init__(
        self,
        step_loss: Callable[[torch.Tensor], torch.Tensor],
        loss_fn: torch.nn.Module,
        should_stop: Callable[[], bool] | None,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.flags = torch.nn.Parameter(torch.zeros(2, device=device))
        self._step_loss = step_loss
        self._should_stop = should_stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            loss = self._step_loss(x)
        except ValueError as err:  # validation met a NaN: share it, as train() does
            if "found invalid values" not in str(err):
                raise
            loss = self.flags.new_full((), float("nan"))
        stop = float(self._should_stop is not None and bool(self._should_stop()))
        news = torch.stack(
            [loss.detach().to(self.flags.dtype), self.flags.new_full((), stop)]
        )
        return loss + (self.flags * news).sum().to(loss.dtype)


def _backend_available(backend: str) -> bool:
    if not dist.is_available():
        return False
    check = getattr(dist, "is_backend_available", None)  # torch >= 2.1
    if check is not None:
        return bool(check(backend))
    return bool(getattr(dist, f"is_{backend}_available")())


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not reaped, does not)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _gist(err: BaseException) -> str:
    """A collective's error in a few words: no source location, no advice."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(err))
    return text.split(". ")[0].rstrip(".")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
