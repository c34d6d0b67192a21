"""The end of a run: final ELBOs, the evaluation of log p(x), figures, report.

Called by :mod:`pyro_vae.cli.run` on the process that writes the run directory
(rank 0 under ``--devices``), after training, with the :class:`TrainedRun` it made.

The numbers come first: ``metrics.json`` and ``report.md`` are written before any
figure is drawn, so nothing that fails later (a figure, a signal) loses them. A
figure that cannot be drawn (too few test data, say) is skipped with a note, and an
evaluation that fails is left out with a note; the notes go into ``metrics.json``
(``notes``), ``report.md`` and, unless ``--quiet``, the terminal. A failed evaluation
still ends the run with its error, after every other file is written. A signal here
stops the process at once (:mod:`pyro_vae.cli.signals`); the checkpoint is whole, and
``--resume`` redoes the end of the run.

The evaluation is by ``--eval-method``: importance sampling (``is``, K =
``--eval-k``), AIS (``ais``: ``--eval-ais-steps``, ``--eval-chains``,
``--eval-leapfrog``) or both; ``--eval-k 0`` skips it whatever the method.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import Module

from pyro_vae.cli import rundir, signals
from pyro_vae.cli.config import FitConfig
from pyro_vae.cli.evaluation import evaluate_split, format_summary, latents_line
from pyro_vae.cli.evaluation_ais import AISOptions
from pyro_vae.cli.figures import save_figures
from pyro_vae.cli.report import build_report
from pyro_vae.data import Splits, evaluation_split
from pyro_vae.errors import PyroVAEError
from pyro_vae.evaluate.latents import latent_diagnostics
from pyro_vae.files import atomic_write_text
from pyro_vae.training.loop import EpochStats, dataset_elbo, make_elbo

__all__ = ["TrainedRun", "finish_run"]


@dataclass(frozen=True)
class TrainedRun:
    """The result of training: the parts, their data, the run directory, history."""

    model: Module
    guide: Module
    splits: Splits
    out: Path
    history: list[EpochStats]


EVALUATION_FILES = (
    "evaluation.json",
    "evaluation.nc",
    "figures/iwae_vs_k.png",
    "figures/khat.png",
    "figures/is_vs_ais.png",
    "figures/bdmc.png",
)


def finish_run(
    cfg: FitConfig, trained: TrainedRun, device: torch.device, started: float
) -> Path:
    """Final ELBOs, the importance-sampled evaluation, metrics, report, figures."""
    out, splits = trained.out, trained.splits
    binarize = cfg.resolved_binarize()
    notes: list[str] = []
    with signals.phase("at the end of training", run_dir=out, trained=True):
        signals.stop_if_pending()  # a stop training swallowed after its last step
    final = _final_elbos(cfg, trained, binarize)
    # the numbers first: metrics.json and report.md with the ELBOs before anything
    # that takes long or may fail. An older evaluation goes: it is redone below,
    # and until then it would describe another model.
    _remove(out, EVALUATION_FILES)

    def save(evaluation: dict | None, latents: dict | None) -> dict:
        """metrics.json (with the notes so far), then report.md from it."""
        with signals.phase("while writing metrics.json and report.md"):
            wall = time.perf_counter() - started
            importance = evaluation if evaluation and "log_px" in evaluation else None
            metrics = rundir.save_metrics(
                out, cfg, final, splits, device, binarize, wall, importance, latents
            )
            metrics.update(_ais_metrics(evaluation))
            _save_notes(out, metrics, notes)
            build_report(out)
            return metrics

    save(None, None)
    evaluation, failure = _final_evaluation(cfg, trained, binarize, notes)
    log_px = None
    if evaluation is not None:
        if "log_px" in evaluation:  # the IS estimate, which figures/elbo.png marks
            log_px = (evaluation["log_px"]["mean"], evaluation["log_px"]["se"])
        latents = evaluation["latents"]
    else:
        latents = _latents_alone(cfg, trained, notes)
    metrics = save(evaluation, latents)  # a report now, whatever the figures do
    report = _figures_and_report(cfg, trained, log_px, metrics, notes)
    with signals.phase("while printing the summary"):
        _print_summary(cfg, out, metrics, evaluation, latents, report, notes)
    if failure is not None:
        raise PyroVAEError(
            f"the final evaluation failed: {_why(failure)}. metrics.json, report.md "
            f"and the figures of {out} are written without it; evaluate again with "
            f"python -m pyro_vae.evaluate {out}"
        ) from None
    return out


def _figures_and_report(
    cfg: FitConfig,
    trained: TrainedRun,
    log_px: tuple[float, float] | None,
    metrics: dict,
    notes: list[str],
) -> Path:
    """Draw the figures, add their notes to ``notes``, rewrite report.md; its path."""
    with signals.phase("while drawing the figures"):
        figure_notes: list[str] = []
        save_figures(
            trained.out,
            trained.model,
            trained.guide,
            trained.splits,
            trained.history,
            log_px,
            seed=cfg.seed,
            notes=figure_notes,
        )
    with signals.phase("while writing report.md"):
        notes += figure_notes
        _save_notes(trained.out, metrics, notes)
        return build_report(trained.out)


def _final_elbos(
    cfg: FitConfig, trained: TrainedRun, binarize: str
) -> dict[str, float]:
    """The trained model's ELBO on the train, valid and test splits."""
    with signals.phase("while computing the final ELBOs"):
        loss_fn = make_elbo(cfg.elbo, cfg.num_particles)(trained.model, trained.guide)
        return {
            split: dataset_elbo(
                loss_fn,
                evaluation_split(trained.splits, split, binarize),
                cfg.batch_size,
            )
            for split in ("train", "valid", "test")
        }


def _final_evaluation(
    cfg: FitConfig, trained: TrainedRun, binarize: str, notes: list[str]
) -> tuple[dict | None, BaseException | None]:
    """The evaluation (``--eval-method``) on the test split, or why it failed."""
    if not cfg.eval_k:
        return None, None
    options = AISOptions(cfg.eval_ais_steps, cfg.eval_chains, cfg.eval_leapfrog)
    with signals.phase("during the final evaluation"):
        try:
            evaluation = evaluate_split(
                trained.model,
                trained.guide,
                trained.splits.test,
                trained.out,
                k=cfg.eval_k,
                seed=cfg.seed,
                split="test",
                binarization=rundir.binarization_note(binarize),
                method=cfg.eval_method,
                options=options,
            )
        except _FAILURES as err:  # e.g. NaN log-densities on the test split
            _remove(trained.out, EVALUATION_FILES)  # none of a failed one's files
            flag = (
                f"--eval-k {cfg.eval_k}"
                if cfg.eval_method == "is"
                else f"--eval-method {cfg.eval_method}"
            )
            notes.append(f"evaluation ({flag}) failed: {_why(err)}")
            return None, err
    return evaluation, None


def _latents_alone(
    cfg: FitConfig, trained: TrainedRun, notes: list[str]
) -> dict | None:
    """The latent diagnostics on the test split, without an evaluation; None if not."""
    with signals.phase("while computing the latent diagnostics"):
        try:
            return latent_diagnostics(
                trained.model, trained.guide, trained.splits.test, seed=cfg.seed
            )
        except _FAILURES as err:
            notes.append(f"latent diagnostics failed: {_why(err)}")
            return None


def _print_summary(
    cfg: FitConfig,
    out: Path,
    metrics: dict,
    evaluation: dict | None,
    latents: dict | None,
    report: Path,
    notes: list[str],
) -> None:
    """The run's summary on stdout, its notes on stderr; nothing with ``--quiet``."""
    if cfg.quiet:
        return
    print(rundir.summary(cfg, metrics, out))
    if evaluation is not None:
        what = {"is": "importance-sampled", "ais": "AIS", "both": "IS and AIS"}
        print(f"\n{what[cfg.eval_method]} evaluation (evaluation.json):")
        print(format_summary(evaluation))
    elif latents is not None:
        print(latents_line(latents) + " (test split)")
    print(f"\nreport: {report}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


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


def _ais_metrics(evaluation: dict | None) -> dict:
    """The AIS numbers of an evaluation for ``metrics.json``; {} without AIS."""
    if not evaluation or "ais" not in evaluation:
        return {}
    extra = {
        "test_log_px_ais": evaluation["ais"]["log_px"]["mean"],
        "test_log_px_ais_se": evaluation["ais"]["log_px"]["se"],
        "eval_ais_estimator": evaluation["ais"]["estimator"],
    }
    if "is_minus_ais" in evaluation:
        extra["test_is_minus_ais"] = evaluation["is_minus_ais"]["mean"]
    extra["ais_warnings"] = evaluation.get("ais_warnings", [])
    return extra


def _save_notes(out: Path, metrics: dict, notes: list[str]) -> None:
    """Add ``notes`` (what was skipped or failed, and why) to ``metrics.json``, and
    write it again if it holds the AIS numbers, which ``save_metrics`` leaves out."""
    if notes:
        metrics["notes"] = list(notes)
    elif "test_log_px_ais" not in metrics:
        return
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
