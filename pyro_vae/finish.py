"""The end of a run: final ELBOs, the importance-sampled evaluation, figures, report.

Called by :mod:`pyro_vae.session` on the process that writes the run directory
(rank 0 under ``--devices``), after training.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.nn import Module

from pyro_vae import rundir
from pyro_vae.config import FitConfig
from pyro_vae.data import Splits, evaluation_split
from pyro_vae.evaluate.latents import latent_diagnostics
from pyro_vae.evaluate.report import evaluate_split, format_summary, latents_line
from pyro_vae.figures import save_figures
from pyro_vae.report import build_report
from pyro_vae.train import EpochStats, dataset_elbo, make_elbo

__all__ = ["finish_run"]


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
    """Final ELBOs, the importance-sampled evaluation, figures, metrics, report."""
    binarize = cfg.resolved_binarize()
    loss_fn = make_elbo(cfg.elbo, cfg.num_particles)(model, guide)
    final = {
        split: dataset_elbo(
            loss_fn, evaluation_split(splits, split, binarize), cfg.batch_size
        )
        for split in ("train", "valid", "test")
    }
    evaluation = None
    if not cfg.eval_k:  # a resumed run must not show an older evaluation
        for stale in (
            "evaluation.json",
            "evaluation.nc",
            "figures/iwae_vs_k.png",
            "figures/khat.png",
        ):
            (out / stale).unlink(missing_ok=True)
    if cfg.eval_k:
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
    log_px = None
    if evaluation is not None:
        log_px = (evaluation["log_px"]["mean"], evaluation["log_px"]["se"])
    save_figures(out, model, guide, splits, history, log_px, seed=cfg.seed)
    latents = (
        evaluation["latents"]
        if evaluation is not None
        else latent_diagnostics(model, guide, splits.test, seed=cfg.seed)
    )
    metrics = rundir.save_metrics(
        out,
        cfg,
        final,
        splits,
        device,
        binarize,
        time.perf_counter() - started,
        evaluation,
        latents,
    )
    report = build_report(out)
    if not cfg.quiet:
        print(rundir.summary(cfg, metrics, out))
        if evaluation is None:
            print(latents_line(latents) + " (test split)")
        else:
            print("\nimportance-sampled evaluation (evaluation.json):")
            print(format_summary(evaluation))
        print(f"\nreport: {report}")
    return out
