"""Failures of the process group: timeouts, and telling a lost process from a bug.

Every collective waits at most :func:`collective_timeout`. When one fails,
:func:`lost_contact` decides whether the error means another process died or hung
(then a :class:`DistributedError` naming the processes found gone) or is an ordinary
bug that must surface as itself.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from pyro_vae.errors import ConfigError, PyroVAEError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "DistributedError",
    "collective_timeout",
    "first_line",
    "lost_contact",
]

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
    "monitoredbarrier",  # gloo's monitored_barrier: a rank that exited or hung
)


class DistributedError(PyroVAEError):
    """A collective failed: another process died, hung, or stopped during set-up."""


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


def lost_contact(
    err: BaseException,
    what: str,
    rank: int,
    world_size: int,
    processes: Sequence[tuple[str, int]],
) -> DistributedError | None:
    """The :class:`DistributedError` that ``err`` means, or None if it is no
    collective's failure (an ordinary bug that must surface as itself).

    Args:
        err: what the collective raised, while this process was doing ``what``.
        rank, world_size: this process's place in the group.
        processes: (host, pid) of every rank, to find those that have exited.
    """
    if isinstance(err, DistributedError):
        return err
    text = str(err).lower()
    is_dist = isinstance(err, getattr(dist, "DistError", ()))
    if not (is_dist or any(word in text for word in _COLLECTIVE_FAILURE)):
        return None
    gone = _gone(processes, rank)
    if gone:
        who = ", ".join(f"rank {r} (pid {pid})" for r, pid in gone)
        cause = f"{who} exited"
    elif world_size == 2:
        cause = f"rank {1 - rank} died or hung"
    else:
        cause = "another process died or hung (torchrun's summary names it)"
    return DistributedError(
        f"rank {rank} of {world_size} lost the other processes while "
        f"{what}: {cause} (the collective failed with: {_gist(err)})"
    )


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (its type's name when it has none)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _gone(processes: Sequence[tuple[str, int]], rank: int) -> list[tuple[int, int]]:
    """(rank, pid) of the processes on this host, other than ``rank``, that exited."""
    host = socket.gethostname()
    peers = [
        (r, pid) for r, (h, pid) in enumerate(processes) if h == host and r != rank
    ]
    deadline = time.monotonic() + 1.0  # a dying peer may take a moment to exit
    while peers:
        gone = [(r, pid) for r, pid in peers if not _alive(pid)]
        if gone or time.monotonic() > deadline:
            return gone
        time.sleep(0.1)
    return []


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
    text = re.sub(r"^\[[^\]]*\]\s*", "", first_line(err))
    return text.split(". ")[0].rstrip(".")
