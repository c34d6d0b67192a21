"""``python -m pyro_vae.fit``: train a VAE and write a run directory.

With no arguments it trains the default VAE (Bernoulli likelihood, dynamic
binarization, 10-d latent, one 400-unit hidden layer) on scikit-learn's digits, which
ship with scikit-learn, so it works offline. Every flag is a field of
:class:`pyro_vae.config.FitConfig`; ``--help`` lists them.

The run directory holds ``config.json``, ``history.csv``, ``metrics.json``,
``checkpoint.pt`` and ``figures/``; :mod:`pyro_vae.rundir` writes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from torch.distributions import kl_divergence
from tqdm.auto import tqdm

from pyro_vae import rundir
from pyro_vae.build import build_model_and_guide
from pyro_vae.config import FitConfig, resolve_device
from pyro_vae.data import BINARIZATIONS, Splits, evaluation_split
from pyro_vae.errors import ConfigError, DataError, PyroVAEError
from pyro_vae.evaluate.latents import latent_diagnostics
from pyro_vae.evaluate.report import evaluate_split, format_summary, latents_line
from pyro_vae.figures import save_figures
from pyro_vae.guides import ENCODERS, GUIDES
from pyro_vae.load import load_run_data
from pyro_vae.losses import LOSSES, make_objective
from pyro_vae.models import LIKELIHOODS, PRIORS
from pyro_vae.nn import ACTIVATIONS, parse_hidden
from pyro_vae.report import build_report
from pyro_vae.sources import DATASETS
from pyro_vae.train import ELBOS, EpochStats, dataset_elbo, make_elbo, train

__all__ = ["build_parser", "main", "parse_args", "run"]

_CHOICES = {
    "dataset": DATASETS,
    "binarize": ("auto", *BINARIZATIONS),
    "prior": tuple(PRIORS),
    "likelihood": tuple(LIKELIHOODS),
    "guide": tuple(GUIDES),
    "activation": tuple(ACTIVATIONS),
    "elbo": tuple(ELBOS),
    "arch": tuple(ENCODERS),
    "loss": LOSSES,
    "kernel": ("rbf", "imq", "rbf-multi", "imq-multi"),
}


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`FitConfig` field, with the field's default and help."""
    parser = argparse.ArgumentParser(
        prog="python -m pyro_vae.fit",
        description="Train a VAE written in Pyro. ELBOs are reported in nats per "
        "datum, higher is better (Pyro's loss is the negative ELBO).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(FitConfig):
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if isinstance(f.default, bool):
            if f.default:
                parser.add_argument(
                    "--no-" + flag[2:],
                    dest=f.name,
                    action="store_false",
                    help=help_text,
                )
            else:
                parser.add_argument(flag, action="store_true", help=help_text)
            continue
        kind = {tuple: _hidden}.get(type(f.default), type(f.default))
        parser.add_argument(
            flag,
            dest=f.name,
            type=str if f.default is None else kind,
            default=f.default,
            choices=_CHOICES.get(f.name),
            help=help_text,
        )
    return parser


def _hidden(text: str) -> tuple[int, ...]:
    try:
        return parse_hidden(text)
    except ValueError as err:  # argparse shows only ArgumentTypeError's own words
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: Sequence[str] | None = None) -> FitConfig:
    """Parse flags into a checked :class:`FitConfig`; exits 2 if one is wrong."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return FitConfig(**vars(args))
    except ConfigError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def run(cfg: FitConfig) -> Path:
    """Train the VAE that ``cfg`` describes and write its run directory."""
    started = time.perf_counter()
    pyro.settings.set(module_local_params=True)
    pyro.set_rng_seed(cfg.seed)
    device = resolve_device(cfg.device)
    binarize = cfg.resolved_binarize()
    splits = load_run_data(cfg, device)
    if cfg.batch_size > len(splits.train):
        raise ConfigError(
            f"--batch-size {cfg.batch_size} exceeds the {len(splits.train)} training "
            f"data of {cfg.dataset}; use at most {len(splits.train)}"
        )
    model, guide = build_model_and_guide(cfg, splits.data_dim, splits.image_shape)
    model, guide = model.to(device, torch.float32), guide.to(device, torch.float32)
    _check_support(model.likelihood, splits, binarize)
    if cfg.elbo == "meanfield":
        _check_closed_form_kl(model, guide, splits.valid[:2], cfg)
    out = rundir.create(cfg)
    elbo = make_elbo(cfg.elbo, cfg.num_particles)
    objective = _objective(cfg)
    history, optimizer = train(
        model,
        guide,
        splits.train,
        splits.valid,
        elbo=elbo,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        objective=objective,
        dynamic_binarization=binarize == "dynamic",
        progress=not cfg.quiet and sys.stderr.isatty(),
        on_epoch=lambda stats: _report_epoch(out, stats, cfg),
    )
    loss_fn = elbo(model, guide)
    final = {
        split: dataset_elbo(
            loss_fn, evaluation_split(splits, split, binarize), cfg.batch_size
        )
        for split in ("train", "valid", "test")
    }
    rundir.save_checkpoint(
        out, cfg, model, guide, optimizer, epoch=len(history), splits=splits
    )
    evaluation = None
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


def _objective(cfg: FitConfig) -> ELBO | None:
    """None for the plain ELBO (``--elbo`` picks it), else the InfoVAE-family loss."""
    if cfg.loss == "elbo":
        return None
    try:
        return make_objective(
            cfg.loss,
            alpha=cfg.alpha,
            lam=cfg.lam,
            beta=cfg.beta,
            kernel=cfg.kernel,
            bandwidth=cfg.bandwidth,
            num_particles=cfg.num_particles,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _report_epoch(out: Path, stats: EpochStats, cfg: FitConfig) -> None:
    rundir.append_history(out, stats)
    if not cfg.quiet:
        line = (
            f"epoch {stats.epoch:>4}/{cfg.epochs}  ELBO (nats per datum, higher is "
            f"better): train {stats.train_elbo:9.3f}  valid {stats.valid_elbo:9.3f}"
        )
        if cfg.loss != "elbo":
            line += f"  {cfg.loss} loss {stats.train_loss:9.3f}"
        tqdm.write(line)


def _check_closed_form_kl(
    model: torch.nn.Module, guide: torch.nn.Module, x: torch.Tensor, cfg: FitConfig
) -> None:
    """``--elbo meanfield`` needs KL(q(z|x) || p(z)) in closed form: refuse otherwise.

    Pyro's TraceMeanField_ELBO silently falls back to a Monte Carlo KL; pyro_vae
    refuses instead, so that "meanfield" always means the analytic KL.
    """
    with torch.no_grad(), torch.random.fork_rng():
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, guide_trace)).get_trace(x)
    q, p = guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"]
    try:
        kl_divergence(q, p)
    except NotImplementedError:
        raise ConfigError(
            f"--elbo meanfield needs KL(q(z|x) || p(z)) in closed form, and there is "
            f"none for the {cfg.guide} guide ({type(q).__name__}) against the "
            f"{cfg.prior} prior ({type(p).__name__}); use --elbo trace (a Monte Carlo "
            "KL) for this pair"
        ) from None


def _check_support(likelihood: object, splits: Splits, binarize: str) -> None:
    """Every split the likelihood will score must lie in its support."""
    scored = [splits.valid, splits.test]
    if binarize != "dynamic":  # dynamic batches are Bernoulli draws: binary by design
        scored.append(splits.train)
    try:
        for x in scored:
            likelihood.check_data(x)
    except ValueError as err:
        raise DataError(str(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status instead of raising."""
    try:
        cfg = parse_args(argv)
    except SystemExit as stop:  # --help, or a flag argparse rejected
        return int(stop.code or 0)
    try:
        run(cfg)
    except PyroVAEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
