"""Atomic checkpoint files: a reader never sees a half-written one.

A checkpoint is written through :func:`pyro_vae.files.atomic_open`, like every file
of a run: a temporary file beside the target, fsynced, then renamed over it. A crash
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import torch

from pyro_vae.errors import PyroVAEError
from pyro_vae.files import STRAY_GLOB, atomic_open

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "load_checkpoint",
    "remove_stray_temporaries",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = 1


class CheckpointError(PyroVAEError):
    """A checkpoint that is missing, unreadable or not ours."""


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` (plus a format tag) to ``path`` atomically.

    Raises:
        OSError: naming ``path`` (not the temporary file), if it cannot be written
            (read-only, disk full); the previous checkpoint there is left as it was.
    """
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save({"format": CHECKPOINT_FORMAT, **payload}, f)
    return path


#: the temporary files of the atomic writes of a run directory (checkpoint, history,
#: metrics, report, evaluation); a process killed mid-write leaves one behind
STRAY_PATTERNS = (STRAY_GLOB,)


def remove_stray_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete what killed atomic writes left in ``directory``; the removed paths.

    Call it only while holding the directory's lock (:mod:`pyro_vae.cli.runlock`): a
    live writer's temporary file looks the same.
    """
    removed = []
    for pattern in STRAY_PATTERNS:
        for stray in Path(directory).glob(pattern):
            if stray.is_file():
                stray.unlink(missing_ok=True)
                removed.append(stray)
    return removed


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU.

    Raises:
        CheckpointError: naming the file and what to do, if it is missing, truncated,
            corrupt, or not a pyro_vae checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(_missing(path))
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


def _missing(path: Path) -> str:
    """Why there is no checkpoint at ``path``, and what to do instead."""
    folder = path.parent
    if folder.is_file():
        return (
            f"{folder} is a file, not a run directory; give the directory that "
            f"holds it ({folder.parent})"
        )
    if path.exists():
        return f"{path} is not a file; a run directory holds its checkpoint there"
    if (folder / "config.json").is_file():
        return (
            f"no checkpoint at {path}: the run in {folder} stopped before its first "
            "checkpoint, so there is nothing to evaluate; resume it, which starts it "
            f"from epoch 1: python -m pyro_vae.fit --resume {shlex.quote(str(folder))}"
        )
    return f"no checkpoint at {path}; train a run first (python -m pyro_vae.fit)"
