"""Training: the SVI loop, its fast step, checkpoints and RNG state.

* :mod:`.loop`: :func:`train` for any (model, guide) pair, one epoch at a time,
  over :class:`~pyro_vae.data.Splits` with a :class:`Schedule` and
  :class:`TrainOptions`;
* :mod:`.step`: the step's loss, validated once and traced where that is known to
  mean what eager Pyro means (:mod:`.trace_guard`), and fused Adam;
* :mod:`.checkpoint`: checkpoint files, written atomically and loaded safely;
* :mod:`.state`: the training state of a checkpoint and every RNG it restores;
* :mod:`.distributed`: the same training on several processes (torchrun + DDP).

Imports torch, pyro, :mod:`pyro_vae.data`, :mod:`pyro_vae.errors` and
:mod:`pyro_vae.files`; never :mod:`pyro_vae.models`, :mod:`pyro_vae.guides` or the
command line (:mod:`pyro_vae.cli`).
"""

from __future__ import annotations

from pyro_vae.training.loop import (
    ELBOS,
    MAX_PLATE_NESTING,
    SYNC_EVERY,
    EpochStats,
    NonFiniteLossError,
    Schedule,
    TrainingInterrupted,
    TrainOptions,
    dataset_elbo,
    kl_weight_at,
    make_elbo,
    train,
)
from pyro_vae.training.step import (
    StepLoss,
    make_optimizer,
)
from pyro_vae.training.trace_guard import (
    KNOWN_PACKAGES,
    python_state,
    untraceable_reason,
)

__all__ = [
    "ELBOS",
    "EpochStats",
    "KNOWN_PACKAGES",
    "MAX_PLATE_NESTING",
    "NonFiniteLossError",
    "SYNC_EVERY",
    "Schedule",
    "StepLoss",
    "TrainOptions",
    "TrainingInterrupted",
    "dataset_elbo",
    "kl_weight_at",
    "make_elbo",
    "make_optimizer",
    "python_state",
    "train",
    "untraceable_reason",
]
