"""Atomic checkpoint files: a reader never sees a half-written one.

A checkpoint is written to a temporary file in the same directory, flushed and
fsynced, then renamed over the target with ``os.replace``, which is atomic on POSIX
and Windows. A crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pyro_vae.errors import PyroVAEError

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = 1


class CheckpointError(PyroVAEError):
    """A checkpoint that is missing, unreadable or not ours."""


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` (plus a format tag) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU.

    Raises:
        CheckpointError: naming the file and what to do, if it is missing, truncated,
            corrupt, or not a pyro_vae checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; train a run first (pyro_vae.fit)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle errors, ...
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}); it may be "
            "truncated or corrupt. Re-run training to write a new one."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a pyro_vae checkpoint of format {CHECKPOINT_FORMAT}"
        )
    return payload
