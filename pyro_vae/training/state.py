"""Snapshots of a training run that a resumed run continues exactly.

A snapshot, taken at the end of every epoch, holds what the next epoch depends on:
the model's, guide's and optimizer's states, the epoch and step counters, and the
states of every random number generator (torch on CPU and CUDA, numpy, python), so
that a run resumed from it draws the same batches, binarizations and particles as an
uninterrupted one. The RNG states are stored as tensors and plain lists, so a
checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng", "snapshot"]


def capture_rng() -> dict[str, Any]:
    """The current state of every RNG a run uses."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            pos,
            has_gauss,
            cached,
        ],
        "python": [version, list(internal), gauss_next],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put every RNG back where :func:`capture_rng` found it."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def snapshot(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    step: int,
) -> dict[str, Any]:
    """A detached copy of the training state after ``epoch`` (0: before training)."""
    return {
        "model": copy.deepcopy(model.state_dict()),
        "guide": copy.deepcopy(guide.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "epoch": epoch,
        "step": step,
        "rng": capture_rng(),
    }
