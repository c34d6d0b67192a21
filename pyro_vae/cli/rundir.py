"""The files of a run directory, and the summary printed at the end of a run.

* ``config.json``: the resolved :class:`FitConfig`, enough to re-run;
* ``history.csv``: epoch, train_elbo, valid_elbo, seconds, train_loss (nats per datum);
* ``metrics.json``: final ELBOs per split, the objective optimized, wall time,
  device, package versions;
* ``checkpoint.pt``: model, guide and optimizer state plus the config, atomic;
* ``figures/``: drawn by :mod:`pyro_vae.cli.figures`;
* ``.lock``: while a process writes the directory, its PID
(:mod:`pyro_vae.cli.runlock`).

:func:`create` takes only a new or empty directory, or a run that stopped before its
first checkpoint; the ``check_*`` functions refuse a resume whose files would disagree
with each other or with the data.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import time
from dataclasses import asdict, fields, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pyro_vae.cli import runlock
from pyro_vae.cli.config import RESUMABLE, FitConfig
from pyro_vae.data import BINARIZE_SEED, Splits
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.files import atomic_open, atomic_write_text
from pyro_vae.losses import describe_objective
from pyro_vae.training.checkpoint import load_checkpoint, remove_stray_temporaries
from pyro_vae.training.checkpoint import save_checkpoint as _atomic_save
from pyro_vae.training.loop import EpochStats

__all__ = [
    "absolute_paths",
    "append_history",
    "binarization_note",
    "check_config_agrees",
    "check_history",
    "check_relative_data",
    "check_same_data",
    "claim",
    "create",
    "data_signature",
    "default_out",
    "package_versions",
    "read_history",
    "resume_config",
    "rewrite_history",
    "save_checkpoint",
    "save_metrics",
    "summary",
]

HISTORY_FIELDS = [f.name for f in fields(EpochStats)]
#: what ``fit`` writes into a run directory; any other name makes it someone else's
RUN_FILES = {
    "config.json",
    "history.csv",
    "checkpoint.pt",
    "metrics.json",
    "report.md",
    "evaluation.json",
    "evaluation.nc",
    "figures",
    runlock.LOCK_NAME,
}
#: the settings a resume may change and the directory's name: a checkpoint and
#: ``config.json`` of one run may differ in these only
MAY_DIFFER = {*RESUMABLE, "out"}
#: a run that stopped before its first checkpoint holds only these: it can start over
STARTED_FILES = {"config.json", "history.csv"}


def default_out(cfg: FitConfig) -> Path:
    """``cfg.out``, or ``runs/<dataset>-<timestamp>`` (``-2``, ``-3``, ... if taken)."""
    if cfg.out:
        return Path(cfg.out)
    base = f"runs/{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = Path(base), 1
    while out.exists():
        n += 1
        out = Path(f"{base}-{n}")
    return out


def claim(out: str | os.PathLike, what: str = "fit") -> None:
    """Lock ``out`` for this process (:mod:`pyro_vae.cli.runlock`), then delete the
    temporary files a killed process left there."""
    runlock.acquire(out, what)
    remove_stray_temporaries(out)


def create(cfg: FitConfig, out: str | os.PathLike | None = None) -> Path:
    """Make and lock the run directory, write ``config.json`` and an empty
    ``history.csv``; return it.

    ``out`` (default :func:`default_out`) may be new, empty, or a run that stopped
    before its first checkpoint (it starts over); anything else is refused before a
    file is written there.
    """
    if out is None and cfg.out is None:
        out = _new_default(cfg)
    out = Path(out if out is not None else cfg.out)
    try:
        if out.is_symlink() and not out.exists():
            raise ConfigError(
                f"--out {out} is a link to {os.readlink(out)}, which does not exist; "
                "make that directory first, or give another --out"
            )
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a directory")
        _refuse_foreign(out)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # read-only parent, a name too long, a dangling link, ...
        raise ConfigError(
            f"cannot make the run directory {out}: {err.strerror or err}; give an "
            "--out you can write"
        ) from None
    claim(out, "fit")
    _refuse_taken(out)
    (out / "config.json").write_text(cfg.to_json() + "\n")
    with open(out / "history.csv", "w", newline="") as f:
        csv.writer(f).writerow(HISTORY_FIELDS)
    return out


def _new_default(cfg: FitConfig) -> Path:
    """A default run directory no other process can be making at the same time."""
    for _ in range(1000):
        out = default_out(cfg)
        try:
            out.mkdir(parents=True)
            return out
        except FileExistsError:  # another run of the same second got there first
            continue
        except OSError:
            return out  # create() reports it
    return default_out(cfg)


def _entries(out: Path) -> set[str]:
    """The names in ``out``, less the lock and stray temporary files."""
    names = set()
    for entry in out.iterdir():
        if entry.name == runlock.LOCK_NAME:
            continue
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            continue
        names.add(entry.name)
    return names


def _is_our_config(path: Path) -> bool:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    known = {f.name for f in fields(FitConfig)}
    return isinstance(stored, dict) and "dataset" in stored and set(stored) <= known


def _refuse_foreign(out: Path) -> None:
    """Refuse a directory that holds files that are not a run's (checked before
    anything is written there, so nothing of the user's is overwritten)."""
    if not out.is_dir():
        return
    names = _entries(out)
    if "checkpoint.pt" in names:
        return  # a run: refused under the lock, with the --resume command
    foreign = sorted(names - RUN_FILES)
    if not foreign and "config.json" in names:
        foreign = [] if _is_our_config(out / "config.json") else ["config.json"]
    if not foreign and names and "config.json" not in names:
        foreign = sorted(names)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ConfigError(
            f"--out {out} is a directory that holds other files ({shown}) and no "
            "run; give a new or empty directory, so that none of them is "
            "overwritten"
        )


def _refuse_taken(out: Path) -> None:
    """Refuse a run directory that holds more than a run stopped before its first
    checkpoint (checked under the lock)."""
    names = _entries(out)
    if "checkpoint.pt" in names:
        raise ConfigError(
            f"{out} already holds a run; continue it with --resume "
            f"{shlex.quote(str(out))}, or give another --out (its files would mix "
            "with this run's)"
        )
    left = sorted(names - STARTED_FILES)
    if left:
        raise ConfigError(
            f"{out} holds a run's results ({', '.join(left)}) but no checkpoint.pt, "
            "so it can neither be resumed nor started over in place; give another "
            "--out"
        )


def append_history(out: Path, stats: EpochStats) -> None:
    """Add one epoch's row, flushed, so a crash keeps every finished epoch."""
    with open(out / "history.csv", "a", newline="") as f:
        csv.writer(f).writerow([getattr(stats, name) for name in HISTORY_FIELDS])


def save_checkpoint(
    out: Path, cfg: FitConfig, state: dict[str, Any], splits: Splits
) -> Path:
    """Write ``checkpoint.pt`` atomically from a
    :func:`pyro_vae.training.state.snapshot`.
    """
    payload = {
        **state,
        "config": asdict(cfg),
        **data_signature(splits),
        "versions": package_versions(),
    }
    return _atomic_save(payload, out / "checkpoint.pt")


def data_signature(splits: Splits) -> dict[str, Any]:
    """What a checkpoint records of its data: datum shape and split sizes."""
    return {
        "data_dim": splits.data_dim,
        "image_shape": list(splits.image_shape),
        "n_data": [len(splits.train), len(splits.valid), len(splits.test)],
    }


def check_same_data(
    checkpoint: Path, stored: dict[str, Any], splits: Splits, source: str
) -> None:
    """Refuse data that differ in shape or size from those ``checkpoint`` was
    trained on (``stored``: its :func:`data_signature`, as far as it has one)."""
    now = data_signature(splits)
    names = {
        "image_shape": "datum shape",
        "data_dim": "values per datum",
        "n_data": "(train, valid, test) sizes",
    }
    for key, name in names.items():
        if stored.get(key) is None:
            continue
        then, now_ = [
            list(v) if isinstance(v, (list, tuple)) else v
            for v in (stored[key], now[key])
        ]
        if then != now_:
            raise DataError(
                f"the data of this run ({source}) are not those {checkpoint} was "
                f"trained on: {name} {_show(then)} then, {_show(now_)} now. Put "
                "the run's own data back, or train a new run on these (--out)"
            )


def _show(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, list) else str(value)


def absolute_paths(cfg: FitConfig) -> FitConfig:
    """``cfg`` with its data paths absolute, so that the run finds its data from
    any working directory (``evaluate``, ``--resume``)."""
    changes = {}
    if cfg.data_path is not None and not os.path.isabs(cfg.data_path):
        changes["data_path"] = os.path.abspath(cfg.data_path)
    if cfg.dataset not in ("digits", "npz") and not os.path.isabs(cfg.data_dir):
        changes["data_dir"] = os.path.abspath(cfg.data_dir)
    return replace(cfg, **changes) if changes else cfg


def check_relative_data(cfg: FitConfig, run_dir: str | os.PathLike) -> None:
    """Refuse a relative data path (runs written before paths were made absolute)
    that does not exist from here: it was relative to another directory."""
    paths = [("--data-path", cfg.data_path)]
    if cfg.dataset not in ("digits", "npz"):
        paths.append(("--data-dir", cfg.data_dir))
    for flag, path in paths:
        if path is not None and not os.path.isabs(path) and not os.path.exists(path):
            raise DataError(
                f"{run_dir} gives its data as the relative path {flag} {path}, which "
                f"is not in this working directory ({os.getcwd()}); run from the "
                "directory the run was trained in"
            )


def resume_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The stored config a resumed run continues with: its checkpoint's, or, for a
    run that stopped before its first checkpoint, its ``config.json``'s."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not (run_dir / "checkpoint.pt").exists() and _is_our_config(path):
        return json.loads(path.read_text())
    return load_checkpoint(run_dir / "checkpoint.pt")["config"]


def check_config_agrees(out: Path, stored: Any) -> None:
    """Refuse a checkpoint whose config (``stored``) is not the one ``config.json``
    holds, other than in :data:`MAY_DIFFER`: a checkpoint copied from another run."""
    try:
        on_disk = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return  # missing or unreadable: the resume writes it anew
    if not isinstance(on_disk, dict) or not isinstance(stored, dict):
        return
    stored = json.loads(json.dumps(stored))  # tuples as lists, as in the file
    differ = sorted(
        key
        for key in set(on_disk) | set(stored)
        if key not in MAY_DIFFER and on_disk.get(key) != stored.get(key)
    )
    if differ:
        flags = ", ".join("--" + key.replace("_", "-") for key in differ)
        raise ConfigError(
            f"{out / 'checkpoint.pt'} is not the checkpoint of the run "
            f"{out / 'config.json'} describes (they differ in {flags}): was it copied "
            "from another run? Put this run's checkpoint back, or resume the run it "
            "came from"
        )


def check_history(out: Path, rows: list[EpochStats], epoch: int, step: int) -> None:
    """Refuse a ``history.csv`` whose rows up to the checkpoint's ``epoch`` are not
    epochs 1..epoch ending at the checkpoint's ``step``."""
    epochs = [r.epoch for r in rows]
    if epochs == list(range(1, epoch + 1)) and (not rows or rows[-1].step == step):
        return
    have = f"epochs {epochs[0]}..{epochs[-1]}" if epochs else "no epochs"
    if epochs and epochs != list(range(epochs[0], epochs[-1] + 1)):
        have = f"{len(epochs)} rows out of order or repeated"
    elif rows and epochs[-1] == epoch:
        have = f"step {rows[-1].step} at epoch {epoch}, the checkpoint step {step}"
    raise ConfigError(
        f"{out / 'history.csv'} does not match {out / 'checkpoint.pt'} (epoch "
        f"{epoch}): it has {have}; the two come from different runs or were edited. "
        "Put the run's own files back, or start a new run (--out)"
    )


def read_history(out: Path, up_to_epoch: int | None = None) -> list[EpochStats]:
    """The rows of ``history.csv`` (those up to ``up_to_epoch``, if given).

    A last line without its line end was cut mid-write (a killed process, a full
    disk): its epoch never finished, and it is left out.

    Raises:
        ValueError: naming the line, for a row that is not one of epoch numbers.
    """
    path = out / "history.csv"
    with open(path, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines.pop()
    reader = csv.DictReader(lines)
    rows = []
    for r in reader:
        try:
            if None in r or None in r.values():
                raise ValueError("wrong number of fields")
            rows.append(
                EpochStats(
                    epoch=int(r["epoch"]),
                    train_elbo=float(r["train_elbo"]),
                    valid_elbo=float(r["valid_elbo"]),
                    seconds=float(r["seconds"]),
                    train_loss=float(r["train_loss"]),
                    step=int(r["step"]),
                )
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"line {reader.line_num} of {path} is not a row of epoch numbers "
                f"({type(err).__name__}: {err})"
            ) from None
    return [r for r in rows if up_to_epoch is None or r.epoch <= up_to_epoch]


def rewrite_history(out: Path, rows: list[EpochStats]) -> None:
    """Replace ``history.csv`` with ``rows`` (a resumed run drops later epochs)."""
    with atomic_open(out / "history.csv", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HISTORY_FIELDS)
        for stats in rows:
            writer.writerow([getattr(stats, name) for name in HISTORY_FIELDS])


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
        "objective": describe_objective(
            cfg.loss, cfg.num_particles, cfg.grad_estimator
        ),
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
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
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
        f"objective: {metrics.get('objective', 'ELBO')}",
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
