"""The end of a run: final ELBOs, the importance-sampled evaluation, figures, report.

Called by :mod:`pyro_vae.cli.run` on the process that writes the run directory
(rank 0 under ``--devices``), after training.

The numbers come first: ``metrics.json`` and ``report.md`` are written before any
figure is drawn, so nothing that fails later (a figure, a signal) loses them. A
figure that cannot be drawn (too few test data, say) is skipped with a note, and an
evaluation that fails is left out with a note; the notes go into ``metrics.json``
(``notes``), ``report.md`` and, unless ``--quiet``, the terminal. A failed evaluation
still ends the run with its error, after every other file is written. A signal here
stops the process at once (:mod:`pyro_vae.cli.signals`); the checkpoint is whole, and
``--resume`` redoes the end of the run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch.nn import Module

from pyro_vae.cli import rundir, signals
from pyro_vae.cli.config import FitConfig
from pyro_vae.cli.evaluation import evaluate_split, format_summary, latents_line
from pyro_vae.cli.figures import save_figures
from pyro_vae.cli.report import build_report
from pyro_vae.data import Splits, evaluation_split
from pyro_vae.errors import PyroVAEError
from pyro_vae.evaluate.latents import latent_diagnostics
from pyro_vae.files import atomic_write_text
from pyro_vae.training.loop import EpochStats, dataset_elbo, make_elbo

__all__ = ["finish_run"]


EVALUATION_FILES = (
    "evaluation.json",
    "evaluation.nc",
    "figures/iwae_vs_k.png",
    "figures/khat.png",
)


def finish_run(
    cfg: FitConfig,
    model: Module,
    guide: Module,
    splits: Splits,
    out: Path,
    history: list[EpochStats],
    device: torch.device,
    started: float,
) -> Path:
    """Final ELBOs, the importance-sampled evaluation, metrics, report, figures."""
    binarize = cfg.resolved_binarize()
    notes: list[str] = []
    with signals.phase("at the end of training", run_dir=out, trained=True):
        signals.stop_if_pending()  # a stop training swallowed after its last step
    with signals.phase("while computing the final ELBOs"):
        loss_fn = make_elbo(cfg.elbo, cfg.num_particles)(model, guide)
        final = {
            split: dataset_elbo(
                loss_fn, evaluation_split(splits, split, binarize), cfg.batch_size
            )
            for split in ("train", "valid", "test")
        }
    # the numbers first: metrics.json and report.md with the ELBOs before anything
    # that takes long or may fail. An older evaluation goes: it is redone below,
    # and until then it would describe another model.
    _remove(out, EVALUATION_FILES)

    def save(evaluation: dict | None, latents: dict | None) -> dict:
        """metrics.json (with the notes so far), then report.md from it."""
        with signals.phase("while writing metrics.json and report.md"):
            wall = time.perf_counter() - started
            metrics = rundir.save_metrics(
                out, cfg, final, splits, device, binarize, wall, evaluation, latents
            )
            _save_notes(out, metrics, notes)
            build_report(out)
            return metrics

    save(None, None)
    evaluation, failure = None, None
    if cfg.eval_k:
        with signals.phase("during the final evaluation"):
            try:
                evaluation = evaluate_split(
                    model,
                    guide,
                    splits.test,
                    out,
                    k=cfg.eval_k,
                    seed=cfg.seed,
                    split="test",
                    binarization=rundir.binarization_note(binarize),
                )
            except _FAILURES as err:  # e.g. NaN log-densities on the test split
                _remove(out, EVALUATION_FILES)  # none of a failed evaluation's files
                failure = err
                notes.append(f"evaluation (--eval-k {cfg.eval_k}) failed: {_why(err)}")
    log_px = None
    if evaluation is not None:
        log_px = (evaluation["log_px"]["mean"], evaluation["log_px"]["se"])
        latents = evaluation["latents"]
    else:
        with signals.phase("while computing the latent diagnostics"):
            try:
                latents = latent_diagnostics(model, guide, splits.test, seed=cfg.seed)
            except _FAILURES as err:
                latents = None
                notes.append(f"latent diagnostics failed: {_why(err)}")
    metrics = save(evaluation, latents)  # a report now, whatever the figures do
    with signals.phase("while drawing the figures"):
        figure_notes: list[str] = []
        save_figures(
            out,
            model,
            guide,
            splits,
            history,
            log_px,
            seed=cfg.seed,
            notes=figure_notes,
        )
    with signals.phase("while writing report.md"):
        notes += figure_notes
        _save_notes(out, metrics, notes)
        report = build_report(out)
    with signals.phase("while printing the summary"):
        if not cfg.quiet:
            print(rundir.summary(cfg, metrics, out))
            if evaluation is not None:
                print("\nimportance-sampled evaluation (evaluation.json):")
                print(format_summary(evaluation))
            elif latents is not None:
                print(latents_line(latents) + " (test split)")
            print(f"\nreport: {report}")
        if notes and not cfg.quiet:
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
    if failure is not None:
        raise PyroVAEError(
            f"the final evaluation failed: {_why(failure)}. metrics.json, report.md "
            f"and the figures of {out} are written without it; evaluate again with "
            f"python -m pyro_vae.evaluate {out}"
        ) from None
    return out


#: what a failing evaluation raises: our errors (NaN, estimator checks), Pyro's
#: validation (ValueError), torch (RuntimeError, out of memory)
_FAILURES = (ValueError, RuntimeError, ArithmeticError, MemoryError)


def _why(err: BaseException) -> str:
    """An error's first line; its type too when it is not one of ours."""
    text = (str(err).strip().splitlines() or [""])[0]
    return text if isinstance(err, PyroVAEError) else f"{type(err).__name__}: {text}"


def _remove(out: Path, names: tuple[str, ...]) -> None:
    for name in names:
        (out / name).unlink(missing_ok=True)


def _save_notes(out: Path, metrics: dict, notes: list[str]) -> None:
    """Add ``notes`` (what was skipped or failed, and why) to ``metrics.json``."""
    if not notes:
        return
    metrics["notes"] = list(notes)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
