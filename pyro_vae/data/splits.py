"""Data as tensors on the training device: checks, splits and binarization.

Every dataset becomes float32 tensors of shape ``(N, D)`` with values in [0, 1],
plus the image shape for pictures. Training batches are index slices of the one
training tensor, with no DataLoader in the loop.

Binarization (needed by the Bernoulli likelihood):

* ``dynamic``: every training batch is a fresh draw x_b ~ Bernoulli(x) (Salakhutdinov
  & Murray, 2008; the protocol of Burda et al., 2016). The validation and test splits
  are binarized once, with a fixed seed, so their numbers are comparable across runs.
* ``static``: every split is binarized once with a fixed seed.
* ``none``: the data are used as they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from pyro_vae.errors import DataError

__all__ = [
    "BINARIZATIONS",
    "BINARIZE_SEED",
    "SPLIT_SEED",
    "Splits",
    "batches",
    "binarize_splits",
    "check_images",
    "evaluation_split",
    "split_train_valid",
]

BINARIZATIONS = ("dynamic", "static", "none")
SPLIT_SEED = 0  # fixed: the validation split is the same whatever --seed says
BINARIZE_SEED = 1  # fixed: evaluation splits are binarized the same in every run


@dataclass(frozen=True)
class Splits:
    """Train, validation and test data, each ``(N, D)`` float32 in [0, 1].

    ``binarization`` says what :func:`binarize_splits` did to them, so that training
    cannot forget it: ``"dynamic"`` (the training split is in grey levels and each
    batch is drawn afresh; valid and test were drawn once), ``"static"`` (all drawn
    once) or ``"none"``.
    """

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    image_shape: tuple[int, ...]
    train_labels: torch.Tensor | None = None
    valid_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    binarization: str = "none"

    @classmethod
    def of(
        cls,
        train: torch.Tensor,
        valid: torch.Tensor,
        test: torch.Tensor | None = None,
        *,
        binarization: str = "none",
    ) -> Splits:
        """Splits of tensors in hand, e.g. for :func:`pyro_vae.training.train`.

        ``binarization`` says what the data are, as :func:`binarize_splits` would have
        left them: ``"dynamic"`` draws each training batch x_b ~ Bernoulli(x) (the
        evaluation splits are used as given), ``"static"`` and ``"none"`` use every
        split as it is. ``test`` defaults to an empty split, the image shape to
        ``(D,)``.
        """
        if binarization not in BINARIZATIONS:
            raise DataError(
                f"unknown binarization {binarization!r}; choose from {BINARIZATIONS}"
            )
        test = valid[:0] if test is None else test
        return cls(train, valid, test, (train.shape[1],), binarization=binarization)

    @property
    def data_dim(self) -> int:
        return self.train.shape[1]

    def to(self, device: torch.device | str) -> Splits:
        """Move every tensor to ``device`` (data live where the model trains)."""
        moved = {
            name: (value.to(device) if isinstance(value, torch.Tensor) else value)
            for name, value in self.__dict__.items()
        }
        return Splits(**moved)


def check_images(
    x: np.ndarray | torch.Tensor, what: str
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Check an array of data and return it as float32 ``(N, D)`` in [0, 1].

    Accepted shapes: ``(N, D)``, ``(N, H, W)`` or ``(N, C, H, W)``. Scaling rule:
    unsigned 8-bit integers (and other integers above 1, up to 255) are divided by
    255; floats and 0/1 integers must already lie in [0, 1].

    Args:
        x: the array.
        what: its name in error messages, e.g. ``"x_train in data.npz"``.

    Returns:
        The flattened float32 tensor and the per-datum shape.
    """
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":  # bool, int, uint, float
            raise DataError(
                f"{what} has dtype {x.dtype}; give an array of numbers (float in "
                "[0, 1] or 8-bit integers)."
            )
    try:
        t = torch.as_tensor(x)
    except TypeError as err:  # e.g. uint32 in older torch
        raise DataError(f"{what}: cannot convert to a tensor ({err})") from None
    if t.ndim not in (2, 3, 4):
        raise DataError(
            f"{what} has shape {tuple(t.shape)}; expected (N, D), (N, H, W) or "
            "(N, C, H, W) with one datum per row. Reshape it, e.g. "
            "x.reshape(len(x), -1)."
        )
    if t.numel() == 0:
        raise DataError(f"{what} is empty (shape {tuple(t.shape)}); it needs data.")
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if not (t.is_floating_point() or t.dtype in _INTEGER_DTYPES):
        raise DataError(
            f"{what} has dtype {t.dtype}, which is not supported; convert it to "
            "uint8 (8-bit intensities) or to floats in [0, 1]."
        )
    if t.is_floating_point():
        _check_finite(t, what)
    t = _scale_to_unit(t, what)
    image_shape = tuple(t.shape[1:])
    return t.reshape(len(t), -1).to(torch.float32), image_shape


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_finite(t: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        row = int(bad.reshape(len(t), -1).any(dim=1).nonzero()[0])
        raise DataError(
            f"{what} has {int(bad.sum())} NaN or infinite values (first in datum "
            f"{row}); remove those data or impute the values before training."
        )


def _scale_to_unit(t: torch.Tensor, what: str) -> torch.Tensor:
    lo, hi = t.min().item(), t.max().item()
    if not t.is_floating_point():
        if lo >= 0 and hi <= 1:
            return t.float()
        if lo >= 0 and hi <= 255:
            return t.float() / 255.0
        raise DataError(
            f"{what} holds integers in [{lo}, {hi}]; expected 8-bit intensities in "
            "[0, 255] or 0/1 values. Rescale to floats in [0, 1] first."
        )
    if lo < 0 or hi > 1:
        raise DataError(
            f"{what} has values in [{lo:.4g}, {hi:.4g}], outside [0, 1]"
            f"{_scale_hint(lo, hi)}. Scale the data to [0, 1] before training."
        )
    return t


def _scale_hint(lo: float, hi: float) -> str:
    """What to divide float data found in [lo, hi] by, in words."""
    if lo < 0:
        return " (shift and scale them, e.g. (x - x.min()) / (x.max() - x.min()))"
    if 128 < hi <= 255:
        return " (it looks like 8-bit data: divide by 255)"
    top = math.ceil(hi)
    return (
        f" (the largest value is {hi:.4g}: divide by the top of the scale they were "
        f"recorded on, e.g. x / {top:g} for values from 0 to {top:g})"
    )


def split_train_valid(
    x: torch.Tensor, labels: torch.Tensor | None, valid_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Carve a validation set out of ``x`` with the fixed :data:`SPLIT_SEED`."""
    if not 0 < valid_fraction < 1:
        raise DataError(
            f"--valid-fraction must lie strictly between 0 and 1, got {valid_fraction}"
        )
    n_valid = max(1, round(valid_fraction * len(x)))
    if n_valid >= len(x):
        raise DataError(
            f"only {len(x)} training data: too few to carve a validation set of "
            f"{n_valid}; lower --valid-fraction or give more data."
        )
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    v, t = perm[:n_valid], perm[n_valid:]
    if labels is None:
        return x[t], x[v], None, None
    return x[t], x[v], labels[t], labels[v]


def binarize_splits(splits: Splits, binarize: str) -> Splits:
    """Apply the binarization rule of the module docstring to ``splits``.

    For ``dynamic`` the training split stays in grey levels and each batch is drawn
    by :func:`batches`; the evaluation splits are binarized here, once.
    """
    if binarize not in BINARIZATIONS:
        raise DataError(
            f"unknown binarization {binarize!r}; choose from {BINARIZATIONS}"
        )
    if binarize == "none":
        return splits
    gen = torch.Generator(device=splits.train.device).manual_seed(BINARIZE_SEED)

    def draw(x: torch.Tensor) -> torch.Tensor:
        return torch.bernoulli(x, generator=gen)

    if splits.binarization != "none":
        raise DataError(
            f"these splits are already binarized ({splits.binarization}); binarize "
            "the data once"
        )
    train = splits.train if binarize == "dynamic" else draw(splits.train)
    return replace(
        splits,
        train=train,
        valid=draw(splits.valid),
        test=draw(splits.test),
        binarization=binarize,
    )


def evaluation_split(splits: Splits, split: str, binarize: str) -> torch.Tensor:
    """The data of ``split`` as they are scored after :func:`binarize_splits`.

    Under dynamic binarization the training split is kept in grey levels for
    training; to score it, it is binarized once with :data:`BINARIZE_SEED`.
    """
    if split not in ("train", "valid", "test"):
        raise DataError(f"unknown split {split!r}; choose train, valid or test")
    x = getattr(splits, split)
    if split == "train" and binarize == "dynamic":
        gen = torch.Generator(device=x.device).manual_seed(BINARIZE_SEED)
        x = torch.bernoulli(x, generator=gen)
    return x


def batches(
    x: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    dynamic: bool = False,
    order: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield mini-batches of ``x`` by (shuffled) index, on ``x``'s device.

    With ``dynamic=True`` each batch is a fresh Bernoulli draw from its grey levels.
    The last batch may be smaller; every datum is seen once per pass. ``order``, if
    given, is the sequence of indices to take instead (e.g. one process's shard of
    the epoch, :meth:`pyro_vae.training.distributed.DistContext.shard_order`);
    ``shuffle`` is then ignored.
    """
    n = len(x)
    if order is None:
        order = torch.randperm(n, device=x.device) if shuffle else None
    else:
        n = len(order)
    for start in range(0, n, batch_size):
        if order is None:
            batch = x[start : start + batch_size]
        else:
            batch = x[order[start : start + batch_size]]
        yield torch.bernoulli(batch) if dynamic else batch
