"""Load a trained run: its config, its model and guide, and its data.

Like :mod:`pyro_vae.cli.fit`, this is assembly code: it rebuilds the parts by the names
stored in the run's ``config.json`` and loads their weights from ``checkpoint.pt``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig, network_params, resolve_device
from pyro_vae.cli.generate import reconstruct, sample_prior
from pyro_vae.data import Splits, binarize_splits
from pyro_vae.data.sources import load_dataset
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.evaluate.marginal import LogMarginal, log_marginal
from pyro_vae.memory import memory_guard, refuse_if_too_big
from pyro_vae.training.checkpoint import CheckpointError, load_checkpoint

__all__ = ["TrainedVAE", "load", "load_run", "load_run_data", "state_mismatch"]


def load_run(
    run_dir: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, torch.nn.Module, FitConfig]:
    """The trained ``(model, guide, config)`` of a run directory, in eval mode."""
    return _load_parts(run_dir, device)[:3]


def _load_parts(
    run_dir: str | os.PathLike, device: torch.device | str
) -> tuple[torch.nn.Module, torch.nn.Module, FitConfig, int, tuple[int, ...]]:
    """Model and guide (eval mode, on ``device``), config, D and image shape."""
    if not isinstance(run_dir, str | os.PathLike):
        raise ConfigError(
            f"give the run directory as a path (str or pathlib.Path), got "
            f"{run_dir!r}; e.g. pyro_vae.load('runs/digits-...')"
        )
    device = _api_device(device)
    path, payload = _read_checkpoint(Path(run_dir))
    cfg = _stored_config(payload, path)
    data_dim, image_shape = _data_shape(payload, path)
    model, guide, need = _build_networks(cfg, data_dim, image_shape, path)
    _load_weights(path, payload, model, guide)
    with memory_guard(need, f"moving the networks to {device}", "the model's size"):
        model, guide = model.to(device, torch.float32), guide.to(device, torch.float32)
    return model.eval(), guide.eval(), cfg, data_dim, image_shape


def _read_checkpoint(run_dir: Path) -> tuple[Path, dict]:
    """The path of ``run_dir``'s checkpoint and what it holds."""
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory; give a run directory")
    path = run_dir / "checkpoint.pt"
    return path, load_checkpoint(path)


def _stored_config(payload: Mapping[str, Any], path: Path) -> FitConfig:
    """The config stored in the checkpoint at ``path``; CheckpointError if unusable."""
    try:
        return FitConfig.from_dict(
            payload.get("config"), source=f"the config stored in {path}"
        )
    except ConfigError as err:
        raise CheckpointError(
            f"{err}; re-run training with this version, or restore {path}"
        ) from None
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path} holds a config this version cannot use ({err}); re-run "
            "training with this version"
        ) from None


def _build_networks(
    cfg: FitConfig, data_dim: int, image_shape: tuple[int, ...], path: Path
) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """The model and guide ``cfg`` describes, on the CPU, and the bytes they need."""
    values = dataclasses.asdict(cfg) | {"hidden": cfg.hidden}
    need = 4 * network_params(values, data_dim)
    what = (
        f"building the networks that the config stored in {path} describes "
        f"(hidden={','.join(map(str, cfg.hidden))}, latent_dim={cfg.latent_dim})"
    )
    lower = "the memory other programs use, or restore the stored config if edited"
    refuse_if_too_big(need, "cpu", what, lower)
    with memory_guard(need, what, lower):
        model, guide = build_model_and_guide(cfg, data_dim, image_shape)
    return model, guide, need


def _load_weights(
    path: Path,
    payload: Mapping[str, Any],
    model: torch.nn.Module,
    guide: torch.nn.Module,
) -> None:
    """Load the stored weights into model and guide; refuse weights that do not fit."""
    for name, module in (("model", model), ("guide", guide)):
        problem = state_mismatch(module, payload.get(name), name)
        if problem:
            raise CheckpointError(
                f"{path} does not fit the networks that the config stored in it "
                f"describes: {problem}. The stored config was edited, or the weights "
                "come from another run; restore the checkpoint or re-train"
            )
        try:
            module.load_state_dict(payload[name])
        except RuntimeError as err:  # what state_mismatch does not compare
            detail = " ".join(str(err).split())
            raise CheckpointError(
                f"{path} does not fit the networks that the config stored in it "
                f"describes ({detail[:300]}); restore the checkpoint or re-train"
            ) from None


def _api_device(device: object) -> torch.device:
    """``device=`` of the Python API: a name, a ``torch.device`` or a CUDA index."""
    if isinstance(device, torch.device):
        device = str(device)
    elif isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"
    if not isinstance(device, str):
        raise ConfigError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:I' or a torch.device, got "
            f"{device!r}"
        )
    kind = device.split(":")[0]
    if device == "auto" or kind in ("cpu", "cuda"):
        return resolve_device(device, flag="device=")
    try:  # another backend torch knows (mps, ...): as torch names it
        return torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:I'"
        ) from None


def _data_shape(payload: Mapping[str, Any], path: Path) -> tuple[int, tuple[int, ...]]:
    """The checkpoint's data dimension D and datum shape, checked."""
    data_dim = payload.get("data_dim")
    if not isinstance(data_dim, int) or isinstance(data_dim, bool) or data_dim < 1:
        raise CheckpointError(
            f"{path} lacks the data dimension (data_dim is {data_dim!r}); re-run "
            "training to write a new checkpoint"
        )
    shape = payload.get("image_shape") or [data_dim]
    ok = isinstance(shape, list | tuple) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape
    )
    if not ok or math.prod(shape) != data_dim:
        raise CheckpointError(
            f"{path} stores the datum shape {shape!r}, which does not hold its "
            f"data_dim {data_dim} values; restore the checkpoint or re-train"
        )
    return data_dim, tuple(shape)


def state_mismatch(module: torch.nn.Module, state: object, name: str) -> str | None:
    """The first difference between ``module``'s weights and ``state``, in words
    (None when they fit): what ``load_state_dict``'s cut-off error does not say."""
    if not isinstance(state, Mapping):
        return f"its {name} weights are {type(state).__name__}, not a state dict"
    own = module.state_dict()
    for key, tensor in own.items():
        if key not in state:
            return (
                f"{name}.{key} {tuple(tensor.shape)} is not in the checkpoint "
                f"({len(state)} {name} tensors there, {len(own)} expected)"
            )
        stored = state[key]
        if not isinstance(stored, torch.Tensor):
            return f"{name}.{key} is a {type(stored).__name__}, not a tensor"
        if stored.shape != tensor.shape:
            return (
                f"{name}.{key} is {tuple(stored.shape)} in the checkpoint but "
                f"{tuple(tensor.shape)} in the networks"
            )
    extra = sorted(set(state) - set(own))
    if extra:
        return f"the checkpoint's {name}.{extra[0]} has no place in the networks"
    return None


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
    image_shape: tuple[int, ...] = ()

    def __iter__(self):  # noqa: ANN204 - tuple-style unpacking
        return iter((self.model, self.guide, self.config))

    @property
    def device(self) -> torch.device:
        """Where the networks live; inputs are moved there."""
        return next(self.model.parameters()).device

    def sample(self, n: int) -> torch.Tensor:
        """``n`` means of p(x|z) at z ~ p(z), ``(n, D)``."""
        n = _count(n)
        need = 2 * 4 * n * self._width()
        what, lower = f"sample({n})", "n (draw in batches)"
        refuse_if_too_big(need, self.device, what, lower)
        with memory_guard(need, what, lower):
            return sample_prior(
                self.model, torch.zeros(n, self.data_dim, device=self.device)
            )

    def reconstruct(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """E[x'|z] at z ~ q(z|x) for each row of ``x`` ``(N, D)`` (or ``(N, *image
        shape)``), a tensor or array of floats in [0, 1], moved to :attr:`device`."""
        x = self._input(x, "reconstruct")
        need = 2 * 4 * len(x) * self._width()
        what, lower = f"reconstruct on {len(x)} data", "the data per call"
        refuse_if_too_big(need, self.device, what, lower)
        with memory_guard(need, what, lower):
            return reconstruct(self.model, self.guide, x)

    def evaluate(
        self, x: torch.Tensor | np.ndarray, k: int = 1000, seed: int | None = 0
    ) -> LogMarginal:
        """Importance-sampled log p̂(x) per datum (see :mod:`pyro_vae.evaluate`).

        ``x`` as for :meth:`reconstruct`, and in the support of the run's likelihood
        (binary for a Bernoulli run: :meth:`data` gives the run's data so).
        """
        x = self._input(x, "evaluate")
        if seed is not None and (
            not isinstance(seed, int | np.integer)
            or isinstance(seed, bool)
            or not -(2**63) <= seed < 2**63
        ):
            raise ConfigError(
                f"evaluate: seed must be None or an integer from -2**63 to 2**63 - 1, "
                f"got {seed!r}"
            )
        # a model of one's own may have no likelihood part to ask
        likelihood = getattr(self.model, "likelihood", None)
        check_data = getattr(likelihood, "check_data", None)
        try:
            if check_data is not None:
                check_data(x)
        except ValueError as err:
            raise DataError(
                f"evaluate: x does not fit the {self.config.likelihood} likelihood "
                f"of this run: {err}"
            ) from None
        need = 8 * _count(k, "k", least=2) * min(100, len(x))
        with memory_guard(need, f"evaluate with k={k}", "k"):
            return log_marginal(self.model, self.guide, x, k, seed=seed)

    def _width(self) -> int:
        """Activations per datum of one pass through both networks (an estimate)."""
        cfg = self.config
        return 2 * sum(cfg.hidden) + 4 * cfg.latent_dim + 4 * self.data_dim

    def _input(self, x: object, method: str) -> torch.Tensor:
        """``x`` as float32 ``(N, D)`` on :attr:`device`, or a :class:`DataError`."""
        where = f"{method}: x"
        t = _as_tensor(x, where, self.data_dim)
        t = _as_rows(t, where, self.data_dim, self.image_shape)
        return _checked_values(t, where, self.device)

    def data(self) -> Splits:
        """The run's splits, binarized as during training."""
        device = next(self.model.parameters()).device
        return load_run_data(self.config, device)


def _as_tensor(x: object, where: str, data_dim: int) -> torch.Tensor:
    """``x`` (tensor, array or nested lists of numbers) as a detached tensor."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray | list | tuple):
        try:
            array = np.asarray(x)
        except ValueError as err:  # ragged lists
            raise DataError(f"{where} is not a rectangular array ({err})") from None
        if array.dtype.kind not in "biuf":
            raise DataError(
                f"{where} holds {array.dtype} values; give numbers (floats in [0, 1])"
            )
        t = torch.as_tensor(array)
    else:
        raise DataError(
            f"{where} must be a torch.Tensor or numpy array (N, {data_dim}), "
            f"got {type(x).__name__}"
        )
    return t


def _as_rows(
    t: torch.Tensor, where: str, data_dim: int, image_shape: tuple[int, ...]
) -> torch.Tensor:
    """``t`` as ``(N, D)`` with N >= 1 (images flattened), or a :class:`DataError`."""
    shape, d = tuple(t.shape), data_dim
    if t.ndim > 2 and shape[1:] == image_shape:
        t = t.reshape(len(t), -1)
    if t.ndim != 2 or t.shape[1] != d:
        single = shape in ((d,), image_shape)
        one = "; for one datum, x[None]" if single else ""
        images = (
            f" or (N, {', '.join(map(str, image_shape))})"
            if len(image_shape) > 1
            else ""
        )
        raise DataError(
            f"{where} has shape {shape}; this run's model takes (N, {d}){images}, "
            f"one datum per row{one}"
        )
    if len(t) == 0:
        raise DataError(f"{where} has no rows (shape {shape}); give data")
    return t


def _checked_values(t: torch.Tensor, where: str, device: torch.device) -> torch.Tensor:
    """``t`` as float32 on ``device``; refuse complex, non-finite or out-of-[0, 1]."""
    if t.dtype == torch.bool:
        t = t.float()
    if t.is_complex():
        raise DataError(f"{where} is complex ({t.dtype}); give real numbers")
    if not t.is_floating_point():
        lo, hi = t.min().item(), t.max().item()
        if lo < 0 or hi > 1:
            raise DataError(
                f"{where} holds integers in [{lo}, {hi}]; give floats in [0, 1] "
                "(8-bit intensities: x / 255)"
            )
    try:
        t = t.to(device, torch.float32)
    except (RuntimeError, NotImplementedError) as err:  # meta tensors, ...
        raise DataError(
            f"{where} on {t.device} cannot be moved to the model's device "
            f"{device} ({str(err).splitlines()[0]})"
        ) from None
    bad = ~torch.isfinite(t)
    if bad.any():
        row = int(bad.any(dim=1).nonzero()[0])
        raise DataError(
            f"{where} has {int(bad.sum())} NaN or infinite values (first in row "
            f"{row}); remove or impute them"
        )
    lo, hi = t.min().item(), t.max().item()
    if lo < 0 or hi > 1:
        raise DataError(
            f"{where} has values in [{lo:.4g}, {hi:.4g}]; this run was trained on "
            "data scaled to [0, 1], so scale x the same way"
        )
    return t


def load(run_dir: str | os.PathLike, device: torch.device | str = "cpu") -> TrainedVAE:
    """Load a run directory written by ``pyro_vae.cli.fit`` (``torch.load`` with
    ``weights_only=True``)."""
    model, guide, cfg, data_dim, image_shape = _load_parts(run_dir, device)
    return TrainedVAE(model, guide, cfg, data_dim, image_shape)


def _count(n: object, name: str = "n", least: int = 1) -> int:
    """A whole number of draws ``>= least``: an int, numpy integer or 0-d tensor."""
    if isinstance(n, torch.Tensor) and n.ndim == 0 and not n.is_floating_point():
        n = n.item()
    if not isinstance(n, int | np.integer) or isinstance(n, bool):
        raise ConfigError(
            f"{name} must be a whole number >= {least}, got {n!r} ({type(n).__name__})"
        )
    if n < least:
        raise ConfigError(f"{name} must be a whole number >= {least}, got {n}")
    return int(n)
