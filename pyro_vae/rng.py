"""Random-number state: the one helper for a block that must not move the RNGs.

A block that draws (validation before a trace, an evaluation seeded on its own) runs
inside :func:`forked_rng`: torch's CPU generator and the generators of the CUDA
devices that hold the given tensors are saved before it and restored after it, so
training draws afterwards exactly what it would have drawn without the block.

Imports torch only.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

__all__ = ["forked_rng"]


def forked_rng(*tensors: torch.Tensor, enabled: bool = True) -> AbstractContextManager:
    """``torch.random.fork_rng`` over the CPU and the CUDA devices of ``tensors``."""
    devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
    return torch.random.fork_rng(devices=devices, enabled=enabled)
