"""Load a trained run: its config, its model and guide, and its data.

Like :mod:`pyro_vae.fit`, this is assembly code: it rebuilds the parts by the names
stored in the run's ``config.json`` and loads their weights from ``checkpoint.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pyro_vae.build import build_model_and_guide
from pyro_vae.checkpoint import CheckpointError, load_checkpoint
from pyro_vae.config import FitConfig
from pyro_vae.data import Splits, binarize_splits
from pyro_vae.sources import load_dataset

__all__ = ["load_run", "load_run_data"]


def load_run(
    run_dir: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, torch.nn.Module, FitConfig]:
    """The trained ``(model, guide, config)`` of a run directory, in eval mode."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory; give a run directory")
    payload = load_checkpoint(run_dir / "checkpoint.pt")
    try:
        cfg = FitConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{run_dir / 'checkpoint.pt'} holds a config this version cannot use "
            f"({err}); re-run training with this version"
        ) from None
    if not isinstance(payload.get("data_dim"), int):
        raise CheckpointError(f"{run_dir / 'checkpoint.pt'} lacks the data dimension")
    image_shape = payload.get("image_shape") or [payload["data_dim"]]
    model, guide = build_model_and_guide(cfg, payload["data_dim"], image_shape)
    try:
        model.load_state_dict(payload["model"])
        guide.load_state_dict(payload["guide"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{run_dir / 'checkpoint.pt'} does not fit the networks its config "
            f"describes ({str(err).splitlines()[0]}); was config.json edited?"
        ) from None
    model, guide = model.to(device, torch.float32), guide.to(device, torch.float32)
    return model.eval(), guide.eval(), cfg


def load_run_data(cfg: FitConfig, device: torch.device | str = "cpu") -> Splits:
    """The run's splits, binarized as they were for evaluation during ``fit``."""
    splits = load_dataset(
        cfg.dataset,
        data_dir=cfg.data_dir,
        data_path=cfg.data_path,
        valid_fraction=cfg.valid_fraction,
        download=cfg.download,
    )
    return binarize_splits(splits.to(device), cfg.resolved_binarize())
