"""``python -m pyro_vae.fit``: train a VAE and write a run directory.

With no arguments it trains the default VAE (Bernoulli likelihood, dynamic
binarization, 10-d latent, one 400-unit hidden layer) on scikit-learn's digits, which
ship with scikit-learn, so it works offline. Every flag is a field of
:class:`pyro_vae.cli.config.FitConfig`; ``--help`` lists them.

The run directory holds ``config.json``, ``history.csv``, ``metrics.json``,
``checkpoint.pt`` and ``figures/``; :mod:`pyro_vae.cli.rundir` writes them.

``--devices N`` (and ``--num-nodes M``) train one model on N processes per node: when
this process was not started by ``torchrun``, it starts ``torchrun`` with the same
arguments and waits (:func:`pyro_vae.training.distributed.launch`).
"""

# ruff: noqa: E402 - the signal handlers come before torch's imports (below)
from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while torch imports: one line, not a traceback
    from pyro_vae.cli import signals as _signals

    _signals.install("while starting (importing torch)")

import argparse
import dataclasses
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pyro_vae.cli import rundir, signals
from pyro_vae.cli.config import RESUMABLE, FitConfig, resolve_device
from pyro_vae.cli.parts import KINDS, REGISTRIES, check_options
from pyro_vae.cli.run import Interrupted, run
from pyro_vae.data import BINARIZATIONS
from pyro_vae.data.sources import DATASETS
from pyro_vae.errors import CommandParser, ConfigError, PyroVAEError
from pyro_vae.guides import ENCODERS
from pyro_vae.losses import GRAD_ESTIMATORS, LOSSES
from pyro_vae.nn import ACTIVATIONS, parse_hidden
from pyro_vae.training import distributed
from pyro_vae.training.loop import ELBOS

__all__ = ["RESUMABLE", "build_parser", "main", "parse_args", "parse_command"]

_CHOICES = {
    "dataset": DATASETS,
    "binarize": ("auto", *BINARIZATIONS),
    "activation": tuple(ACTIVATIONS),
    "elbo": tuple(ELBOS),
    "arch": tuple(ENCODERS),
    "loss": LOSSES,
    "grad_estimator": GRAD_ESTIMATORS,
    "kernel": ("rbf", "imq", "rbf-multi", "imq-multi"),
}


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """One flag per :class:`FitConfig` field, with the field's default and help.

    With ``defaults=False`` flags that are not given are left out of the result,
    which tells a resumed run which settings the user asked to change.
    """
    parser = CommandParser(
        prog="python -m pyro_vae.fit",
        description="Train a VAE written in Pyro. ELBOs are reported in nats per "
        "datum, higher is better (Pyro's loss is the negative ELBO).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=None if defaults else argparse.SUPPRESS,
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None if defaults else argparse.SUPPRESS,
        help="continue the run in RUN_DIR from its checkpoint, with its config; "
        f"only {', '.join('--' + n.replace('_', '-') for n in RESUMABLE)} may change",
    )
    for f in dataclasses.fields(FitConfig):
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        default = f.default if defaults else argparse.SUPPRESS
        if isinstance(f.default, bool):
            action = "store_false" if f.default else "store_true"
            name = "--no-" + flag[2:] if f.default else flag
            parser.add_argument(
                name, dest=f.name, action=action, default=default, help=help_text
            )
            continue
        kind = {tuple: _hidden}.get(type(f.default), type(f.default))
        if f.name in KINDS:  # a registry name or PACKAGE.MODULE:FACTORY
            kind = _part_name(f.name)
            help_text += (
                f": {', '.join(REGISTRIES[f.name])}, or PACKAGE.MODULE:FACTORY, a "
                "factory of your own called with the run's options (see README)"
            )
        parser.add_argument(
            flag,
            dest=f.name,
            type=str if f.default is None else kind,
            default=default,
            choices=_CHOICES.get(f.name),
            help=help_text,
        )
    return parser


def _part_name(kind: str) -> Callable[[str], str]:
    """argparse type of ``--prior``, ``--likelihood``, ``--guide``: a registry name
    or an import path (checked, and imported, once the config is whole)."""

    def part_name(text: str) -> str:
        if text in REGISTRIES[kind] or ":" in text:
            return text
        names = ", ".join(repr(name) for name in REGISTRIES[kind])
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {names}, or give a {kind} of your "
            "own as PACKAGE.MODULE:FACTORY)"
        )

    part_name.__name__ = kind
    return part_name


def _hidden(text: str) -> tuple[int, ...]:
    try:
        return parse_hidden(text)
    except ValueError as err:  # argparse shows only ArgumentTypeError's own words
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: Sequence[str] | None = None) -> FitConfig:
    """Parse flags into a checked :class:`FitConfig`; exits 2 if one is wrong."""
    return parse_command(argv)[0]


def parse_command(
    argv: Sequence[str] | None = None,
) -> tuple[FitConfig, str | None]:
    """The config and, with ``--resume``, the run directory to continue."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    try:
        if resume is None:
            cfg = FitConfig(**args)
            # import parts of one's own now; refuse a part option given on the
            # command line that the chosen part does not take
            check_options(cfg, vars(build_parser(defaults=False).parse_args(argv)))
            return cfg, None
        given = vars(build_parser(defaults=False).parse_args(argv))
        given.pop("resume")
        fixed = sorted(set(given) - set(RESUMABLE))
        if fixed:
            flags = ", ".join("--" + name.replace("_", "-") for name in fixed)
            raise ConfigError(
                f"{flags} cannot change when resuming: the run keeps its config. "
                "Start a new run (--out) to change them."
            )
        checkpoint = Path(resume) / "checkpoint.pt"
        # a run killed before its first checkpoint continues from its config.json
        stored = rundir.resume_config(resume)
        source = (
            f"the config stored in {checkpoint}"
            if checkpoint.exists()
            else f"{Path(resume) / 'config.json'}"
        )
        return dataclasses.replace(FitConfig.from_dict(stored, source), **given), resume
    except PyroVAEError as err:  # a bad value: one line, no usage block
        parser.fail(str(err))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status instead of raising.

    SIGINT and SIGTERM stop it anywhere with one line and the status 130 or 143:
    training stops after the current step and writes its checkpoint
    (:mod:`pyro_vae.cli.run`); at start-up and at the end of the run the process
    stops at once (:mod:`pyro_vae.cli.signals`), naming the resume command when the run
    has a checkpoint.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    with signals.handled():
        try:
            return _main(argv)
        except signals.Stopped as stop:
            return signals.report(stop)
        except KeyboardInterrupt:  # a SIGINT that reached Python's own handler
            return signals.report(signals.Stopped(signal.SIGINT))


def _main(argv: list[str]) -> int:
    try:
        cfg, resume = parse_command(argv)
    except signals.Stopped:
        raise
    except SystemExit as stop:  # --help, or a flag argparse rejected
        return int(stop.code or 0)
    if distributed.needs_launch(cfg.devices, cfg.num_nodes):
        return _launch(argv, cfg, resume)
    try:
        with signals.phase("while starting", run_dir=resume):
            run(cfg, resume)
    except Interrupted as stop:
        signals.mark_reported()
        print(f"interrupted: {stop}", file=sys.stderr)
        return stop.status
    except PyroVAEError as err:
        signals.mark_reported()
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _launch(argv: list[str], cfg: FitConfig, resume: str | None) -> int:
    """Run this command on ``cfg.devices`` processes per node through torchrun."""
    out = Path(resume) if resume is not None else rundir.default_out(cfg)
    if resume is None and cfg.out is None:  # so that this process knows it too
        argv = [*argv, "--out", str(out)]
    try:
        if cfg.num_nodes > 1 and resume is None and cfg.out is None:
            # each node would stamp its own default name, and only node 0 writes
            raise ConfigError(
                f"--num-nodes {cfg.num_nodes} needs --out DIR, the same on every "
                "node, so that all nodes name one run directory (on a shared disk "
                "for --resume to find the checkpoint)"
            )
        device = resolve_device(cfg.device)
        if device.type == "cuda" and torch.cuda.device_count() < cfg.devices:
            raise ConfigError(
                f"--devices {cfg.devices} on CUDA needs {cfg.devices} GPUs on this "
                f"node; torch sees {torch.cuda.device_count()}. Lower --devices, or "
                "train on the CPU with --device cpu"
            )
        status = distributed.launch(argv, cfg.devices, cfg.num_nodes)
    except PyroVAEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if status:
        hint = ""
        if (out / "checkpoint.pt").is_file():
            hint = f" Resume with: python -m pyro_vae.fit --resume {out}"
        how = f"(torchrun exit status {status})"
        if status in (130, 143):
            how = "on " + signal.Signals(status - 128).name
        print(
            f"error: training on {cfg.devices * cfg.num_nodes} processes stopped "
            f"{how}; the messages above say which process stopped and why.{hint}",
            file=sys.stderr,
        )
    return status


def cli() -> None:
    """Console-script entry point."""
    status = main()
    signals.ignore()  # decided: a signal while Python shuts down does not change it
    sys.exit(status)


if __name__ == "__main__":
    cli()
