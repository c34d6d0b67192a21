"""The files of a run directory, and the summary printed at the end of a run.

* ``config.json``: the resolved :class:`FitConfig`, enough to re-run;
* ``history.csv``: epoch, train_elbo, valid_elbo, seconds, train_loss (nats per datum);
* ``metrics.json``: final ELBOs per split, wall time, device, package versions;
* ``checkpoint.pt``: model, guide and optimizer state plus the config, atomic;
* ``figures/``: drawn by :mod:`pyro_vae.figures`.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from dataclasses import asdict, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pyro_vae.checkpoint import save_checkpoint as _atomic_save
from pyro_vae.config import FitConfig
from pyro_vae.data import BINARIZE_SEED, Splits
from pyro_vae.errors import ConfigError
from pyro_vae.train import EpochStats

__all__ = [
    "append_history",
    "binarization_note",
    "create",
    "default_out",
    "package_versions",
    "read_history",
    "rewrite_history",
    "save_checkpoint",
    "save_metrics",
    "summary",
]

HISTORY_FIELDS = [f.name for f in fields(EpochStats)]


def default_out(cfg: FitConfig) -> Path:
    """``cfg.out``, or ``runs/<dataset>-<timestamp>`` when it is not set."""
    return Path(cfg.out or f"runs/{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")


def create(cfg: FitConfig) -> Path:
    """Make the run directory, write ``config.json`` and an empty ``history.csv``."""
    out = default_out(cfg)
    if (out / "config.json").exists() or (out / "checkpoint.pt").exists():
        raise ConfigError(
            f"{out} already holds a run; continue it with --resume {out}, or give "
            "another --out (its files would mix with this run's)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot make the run directory {out}: {err}") from None
    (out / "config.json").write_text(cfg.to_json() + "\n")
    with open(out / "history.csv", "w", newline="") as f:
        csv.writer(f).writerow(HISTORY_FIELDS)
    return out


def append_history(out: Path, stats: EpochStats) -> None:
    """Add one epoch's row, flushed, so a crash keeps every finished epoch."""
    with open(out / "history.csv", "a", newline="") as f:
        csv.writer(f).writerow([getattr(stats, name) for name in HISTORY_FIELDS])


def save_checkpoint(
    out: Path, cfg: FitConfig, state: dict[str, Any], splits: Splits
) -> Path:
    """Write ``checkpoint.pt`` atomically from a :func:`pyro_vae.resume.snapshot`."""
    payload = {
        **state,
        "config": asdict(cfg),
        "data_dim": splits.data_dim,
        "image_shape": list(splits.image_shape),
        "versions": package_versions(),
    }
    return _atomic_save(payload, out / "checkpoint.pt")


def read_history(out: Path, up_to_epoch: int | None = None) -> list[EpochStats]:
    """The rows of ``history.csv`` (those up to ``up_to_epoch``, if given)."""
    with open(out / "history.csv", newline="") as f:
        rows = [
            EpochStats(
                epoch=int(r["epoch"]),
                train_elbo=float(r["train_elbo"]),
                valid_elbo=float(r["valid_elbo"]),
                seconds=float(r["seconds"]),
                train_loss=float(r["train_loss"]),
                step=int(r["step"]),
            )
            for r in csv.DictReader(f)
        ]
    return [r for r in rows if up_to_epoch is None or r.epoch <= up_to_epoch]


def rewrite_history(out: Path, rows: list[EpochStats]) -> None:
    """Replace ``history.csv`` with ``rows`` (a resumed run drops later epochs)."""
    tmp = out / ".history.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HISTORY_FIELDS)
        for stats in rows:
            writer.writerow([getattr(stats, name) for name in HISTORY_FIELDS])
    os.replace(tmp, out / "history.csv")


def save_metrics(
    out: Path,
    cfg: FitConfig,
    final_elbo: dict[str, float],
    splits: Splits,
    device: torch.device,
    binarize: str,
    wall_seconds: float,
    evaluation: dict[str, Any] | None = None,
    latents: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``metrics.json`` and return what it holds.

    With ``evaluation`` (the summary written to ``evaluation.json``), the test
    split's importance-sampled log p̂(x) ± se, gap and k̂ summary join the ELBOs.
    """
    estimator = "TraceMeanField_ELBO" if cfg.elbo == "meanfield" else "Trace_ELBO"
    metrics = {
        **{f"{split}_elbo": value for split, value in final_elbo.items()},
        "units": "nats per datum; ELBO, higher is better (Pyro's loss is -ELBO)",
        "estimator": f"{estimator}, {cfg.num_particles} particle(s) per datum",
        "binarization": binarization_note(binarize),
        "n_train": len(splits.train),
        "n_valid": len(splits.valid),
        "n_test": len(splits.test),
        "epochs": cfg.epochs,
        "wall_seconds": wall_seconds,
        "device": str(device),
        "processes": cfg.devices * cfg.num_nodes,
        "versions": package_versions(),
    }
    if latents is not None:
        metrics["test_latents"] = latents
    if evaluation is not None:
        metrics["test_log_px"] = evaluation["log_px"]["mean"]
        metrics["test_log_px_se"] = evaluation["log_px"]["se"]
        metrics["test_gap"] = evaluation["gap"]["mean"]
        metrics["test_khat_fraction_above_0.7"] = evaluation["khat"][
            "fraction_above_0.7"
        ]
        metrics["eval_estimator"] = evaluation["estimator"]
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, out / "metrics.json")
    return metrics


def binarization_note(binarize: str) -> str:
    return {
        "dynamic": "dynamic: a fresh Bernoulli draw per training batch; validation "
        f"and test binarized once with seed {BINARIZE_SEED}; the final train ELBO "
        f"scores one draw with seed {BINARIZE_SEED}",
        "static": f"static: every split binarized once with seed {BINARIZE_SEED}",
        "none": "none: intensities in [0, 1] as loaded",
    }[binarize]


def package_versions() -> dict[str, str]:
    """Versions of python and of the packages that decide the numbers."""
    versions = {"python": platform.python_version()}
    for name in ("pyro_vae", "pyro-ppl", "torch", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def summary(cfg: FitConfig, metrics: dict[str, Any], out: Path) -> str:
    """The table ``fit`` prints at the end of a run."""
    processes = cfg.devices * cfg.num_nodes
    where = metrics["device"] + (f" x {processes} processes" if processes > 1 else "")
    lines = [
        f"pyro_vae: {cfg.dataset}, {cfg.likelihood} likelihood, {cfg.prior} prior, "
        f"{cfg.guide} guide, latent {cfg.latent_dim}, {cfg.epochs} epochs, "
        f"{metrics['wall_seconds']:.1f} s on {where}",
        f"estimator: {metrics['estimator']}; binarization: {metrics['binarization']}",
        "",
        f"{'split':<7}{'n':>8}  ELBO (nats per datum, higher is better)",
    ]
    for split in ("train", "valid", "test"):
        lines.append(
            f"{split:<7}{metrics['n_' + split]:>8}  {metrics[split + '_elbo']:10.3f}"
        )
    lines += ["", f"run directory: {out}"]
    return "\n".join(lines)
