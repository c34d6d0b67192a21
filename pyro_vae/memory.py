"""Memory: how much this machine has free, and one-line messages when it is short.

An allocation that does not fit fails deep inside torch or the OS; these helpers
check the size first (:func:`refuse_if_too_big`) or turn the failure into a
:class:`~pyro_vae.errors.ConfigError` that says how much was needed and which
setting to lower (:func:`memory_guard`).

Imports torch and :mod:`pyro_vae.errors` only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from pyro_vae.errors import ConfigError

__all__ = [
    "format_bytes",
    "machine_memory",
    "memory_free",
    "memory_guard",
    "refuse_if_too_big",
]

_MAX_INT = 2**63 - 1


def format_bytes(n: float) -> str:
    """``12 GB``, ``3.4 GB``, ``120 MB``: a size for a message."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return (
                f"{n / size:,.0f} {unit}"
                if n >= 10 * size
                else f"{n / size:.1f} {unit}"
            )
    return f"{n / 1e3:.1f} kB"


def machine_memory(need: int = 0, device: str = "auto") -> int:
    """Bytes of the largest memory of this machine that ``device`` may use: its RAM,
    or a CUDA device's when that is larger. CUDA is asked only when ``need`` exceeds
    the RAM, so that a check that passes never initializes it."""
    host = _host_memory()
    if need <= host or device == "cpu":
        return host
    return max(host, _gpu_memory())


def _host_memory() -> int:
    """Bytes of RAM of this machine (no limit where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return _MAX_INT


def _gpu_memory() -> int:
    """Bytes of the largest CUDA device; 0 without one (initializes CUDA)."""
    if not torch.cuda.is_available():
        return 0
    return max(
        torch.cuda.get_device_properties(i).total_memory
        for i in range(torch.cuda.device_count())
    )


def memory_free(device: torch.device | str = "cpu") -> int:
    """Bytes that ``device`` can still give: MemAvailable for the CPU (Linux), the
    free memory of a CUDA device; no limit for other devices or systems."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return _MAX_INT
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return _host_memory()


def refuse_if_too_big(
    need: int, device: torch.device | str, what: str, lower: str
) -> None:
    """A :class:`ConfigError` "``what`` needs about X GB ...; lower ``lower``" when
    ``need`` bytes are more than ``device`` has free."""
    free = memory_free(device)
    if need > free:
        raise ConfigError(
            f"{what} needs about {format_bytes(need)} of memory, more than the "
            f"{format_bytes(free)} free on {torch.device(device)}; lower {lower}"
        )


_OOM = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


@contextlib.contextmanager
def memory_guard(need: int, what: str, lower: str) -> Iterator[None]:
    """Turn an allocation failure inside the block into a :class:`ConfigError`
    saying that ``what`` needs about ``need`` bytes and to lower ``lower``."""
    try:
        yield
    except (*_OOM, RuntimeError) as err:
        text = str(err).lower()
        if not isinstance(err, _OOM) and not (
            "memory" in text and ("allocate" in text or "out of" in text)
        ):
            raise
        raise ConfigError(
            f"{what} needs about {format_bytes(need)} of memory, and the allocation "
            f"failed ({str(err).splitlines()[0][:120]}); lower {lower}"
        ) from None
