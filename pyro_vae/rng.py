"""Random-number state: the one helper for a block that must not move the RNGs.

A block that draws (validation before a trace, an evaluation seeded on its own) runs
inside :func:`forked_rng`: torch's CPU generator and the generators of the CUDA
devices that hold the given tensors are saved before it and restored after it, so
training draws afterwards exactly what it would have drawn without the block.

Imports torch only.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch

__all__ = [
    "counter_normal",
    "counter_uniform",
    "datum_keys",
    "forked_rng",
    "mix32",
]


def forked_rng(*tensors: torch.Tensor, enabled: bool = True) -> AbstractContextManager:
    """``torch.random.fork_rng`` over the CPU and the CUDA devices of ``tensors``."""
    devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
    return torch.random.fork_rng(devices=devices, enabled=enabled)


# --- Counter-based draws: a datum's randomness from (seed, its index) alone -------
#
# Torch's generators are streams: what a datum draws depends on everything drawn
# before it, so results would change with the chunking of the data or with the
# number of processes. The draws below are a pure function of a 32-bit key per
# datum and a counter per draw instead: a 32-bit integer hash (two rounds of
# xor-shift-multiply, the "lowbias32" constants of Wellons' hash-prospector, both
# below 2**31 so that every product fits in int64 exactly) turns (key, counter,
# element) into 32 uniform bits, on any device, in plain tensor arithmetic.

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A bijective 32-bit integer hash of values in [0, 2**32) (int64 or int)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def datum_keys(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Keys, int64 in [0, 2**32), for the data of global indices ``index``."""
    lo, hi = seed & _M32, (seed >> 32) & _M32
    head = mix32(mix32(lo ^ _GOLDEN) ^ hi)
    return mix32(mix32(index.long() & _M32) ^ head)


def counter_bits(keys: torch.Tensor, counter: int, count: int) -> torch.Tensor:
    """``(count, len(keys))`` hashed 32-bit integers for draw number ``counter``.

    Element j of datum i is ``mix32(mix32(s_i + j * golden) ^ s_i)`` with
    ``s_i = mix32(mix32(key_i ^ mix32(lo)) ^ mix32(hi ^ golden))``, where lo and hi
    are the counter's low and high 32 bits: distinct 64-bit counters and elements
    give unrelated bits, and nothing depends on which other data share the batch.
    """
    if not 0 <= counter < 2**64:
        raise ValueError(f"counter {counter} is not a 64-bit unsigned integer")
    lo, hi = counter & _M32, (counter >> 32) & _M32
    stream = mix32(mix32(keys ^ mix32(lo)) ^ mix32(hi ^ _GOLDEN))
    j = torch.arange(count, device=keys.device, dtype=torch.int64)[:, None]
    return mix32(mix32((stream + j * _GOLDEN) & _M32) ^ stream)


def counter_uniform(
    keys: torch.Tensor,
    counter: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    axis: int = 1,
) -> torch.Tensor:
    """Uniform draws in (0, 1) of ``shape``, whose dim ``axis`` is the data axis
    (size ``len(keys)``), e.g. ``(chains, N, d)`` or ``(chains, N)`` with axis 1."""
    if shape[axis] != len(keys):
        raise ValueError(
            f"shape {shape} has no data axis of size {len(keys)} at {axis}"
        )
    lead, trail = shape[:axis], shape[axis + 1 :]
    bits = counter_bits(keys, counter, math.prod(lead) * math.prod(trail))
    u = (bits.double() + 0.5) / 2.0**32  # (count, N)
    return u.reshape(*lead, *trail, len(keys)).movedim(-1, axis).to(dtype)


def counter_normal(
    keys: torch.Tensor,
    counter: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    axis: int = 1,
) -> torch.Tensor:
    """Standard normal draws of ``shape`` (Box-Muller on two counter-uniforms)."""
    both = counter_uniform(keys, counter, (2, *shape), torch.float64, axis + 1)
    radius = torch.sqrt(-2.0 * torch.log(both[0]))
    return (radius * torch.cos(2 * math.pi * both[1])).to(dtype)
