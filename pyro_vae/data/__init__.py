"""Data in: datasets, splits and binarization.

* :mod:`.splits`: :class:`Splits` (train, valid, test, with their binarization),
  the checks that turn an array into float32 ``(N, D)`` in [0, 1], binarization and
  on-device batches;
* :mod:`.sources`: the named datasets (scikit-learn's digits, the MNIST family through
  torchvision or local IDX files, ``.npz`` files) as :class:`Splits`.

Imports torch, numpy and :mod:`pyro_vae.errors`; nothing else of pyro_vae.
"""

from __future__ import annotations

from pyro_vae.data.sources import (
    DATASETS,
    IDX_FILES,
    load_dataset,
)
from pyro_vae.data.splits import (
    BINARIZATIONS,
    BINARIZE_SEED,
    SPLIT_SEED,
    Splits,
    batches,
    binarize_splits,
    check_images,
    evaluation_split,
    split_train_valid,
)

__all__ = [
    "BINARIZATIONS",
    "BINARIZE_SEED",
    "DATASETS",
    "IDX_FILES",
    "SPLIT_SEED",
    "Splits",
    "batches",
    "binarize_splits",
    "check_images",
    "evaluation_split",
    "load_dataset",
    "split_train_valid",
]
