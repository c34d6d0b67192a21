"""Load a trained run: its config, its model and guide, and its data.

Like :mod:`pyro_vae.fit`, this is assembly code: it rebuilds the parts by the names
stored in the run's ``config.json`` and loads their weights from ``checkpoint.pt``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pyro_vae.build import build_model_and_guide
from pyro_vae.checkpoint import CheckpointError, load_checkpoint
from pyro_vae.config import FitConfig
from pyro_vae.data import Splits, binarize_splits
from pyro_vae.evaluate.marginal import LogMarginal, log_marginal
from pyro_vae.generate import reconstruct, sample_prior
from pyro_vae.sources import load_dataset

__all__ = ["TrainedVAE", "load", "load_run", "load_run_data"]


def load_run(
    run_dir: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, torch.nn.Module, FitConfig]:
    """The trained ``(model, guide, config)`` of a run directory, in eval mode."""
    return _load_parts(run_dir, device)[:3]


def _load_parts(
    run_dir: str | os.PathLike, device: torch.device | str
) -> tuple[torch.nn.Module, torch.nn.Module, FitConfig, int]:
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
    return model.eval(), guide.eval(), cfg, payload["data_dim"]


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


@dataclass(frozen=True)
class TrainedVAE:
    """A trained run, ready to evaluate, sample and reconstruct.

    ``model`` and ``guide`` are in eval mode on ``device``; ``config`` is the run's
    :class:`FitConfig`. Unpacks as ``model, guide, config = pyro_vae.load(run_dir)``.
    """

    model: torch.nn.Module
    guide: torch.nn.Module
    config: FitConfig
    data_dim: int

    def __iter__(self):  # noqa: ANN204 - tuple-style unpacking
        return iter((self.model, self.guide, self.config))

    def sample(self, n: int) -> torch.Tensor:
        """``n`` means of p(x|z) at z ~ p(z), ``(n, D)``."""
        device = next(self.model.parameters()).device
        return sample_prior(self.model, torch.zeros(n, self.data_dim, device=device))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x'|z] at z ~ q(z|x) for each row of ``x``."""
        return reconstruct(self.model, self.guide, x)

    def evaluate(self, x: torch.Tensor, k: int = 1000, seed: int = 0) -> LogMarginal:
        """Importance-sampled log p̂(x) per datum (see :mod:`pyro_vae.evaluate`)."""
        return log_marginal(self.model, self.guide, x, k, seed=seed)

    def data(self) -> Splits:
        """The run's splits, binarized as during training."""
        device = next(self.model.parameters()).device
        return load_run_data(self.config, device)


def load(run_dir: str | os.PathLike, device: torch.device | str = "cpu") -> TrainedVAE:
    """Load a run directory written by ``pyro_vae.fit`` (``torch.load`` with
    ``weights_only=True``)."""
    model, guide, cfg, data_dim = _load_parts(run_dir, device)
    return TrainedVAE(model, guide, cfg, data_dim)
