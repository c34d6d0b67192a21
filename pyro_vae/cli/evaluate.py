"""``python -m pyro_vae.evaluate RUN_DIR``: importance-sampled log p(x) of a run.

Loads ``RUN_DIR/checkpoint.pt``, estimates log p̂(x) per datum with K importance
samples, checks ELBO ≤ IWAE_k ≤ log p̂(x), and writes ``evaluation.json``,
``evaluation.nc`` and two figures into the run directory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pyro_vae.cli import rundir, runlock
from pyro_vae.cli.config import resolve_device
from pyro_vae.cli.evaluation import evaluate_split, format_summary
from pyro_vae.cli.loading import load, load_run_data
from pyro_vae.data import evaluation_split
from pyro_vae.errors import CommandParser, PyroVAEError
from pyro_vae.memory import format_bytes, machine_memory

__all__ = ["build_parser", "main"]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _at_least_two(text: str) -> int:
    value = _positive(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            "must be at least 2: one sample per datum gives no Monte Carlo error"
        )
    return value


def _samples(text: str) -> int:
    """``--k``: at least 2, and few enough that one datum's K float64 log-weights
    fit in this machine (the full check, for N data, comes before evaluating)."""
    value = _at_least_two(text)
    need = 8 * value
    if need > machine_memory(need):
        raise argparse.ArgumentTypeError(
            f"{value} samples need about {format_bytes(need)} of memory per datum "
            f"for their log-weights, more than the {format_bytes(machine_memory(need))}"
            " this machine has; lower --k"
        )
    return value


_SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch.manual_seed takes


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not _SEED_RANGE[0] <= value <= _SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(
            f"must be an integer from -2**63 to 2**63 - 1, got {value}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m pyro_vae.evaluate",
        description="Importance-sampled log p(x), per datum, of a trained run, in "
        "nats per datum (higher is better).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "run_dir", help="a run directory written by python -m pyro_vae.fit"
    )
    parser.add_argument(
        "--k", type=_samples, default=5000, help="K, samples per datum (>= 2)"
    )
    parser.add_argument(
        "--split", choices=("test", "valid", "train"), default="test", help="data split"
    )
    parser.add_argument(
        "--n", type=_at_least_two, default=None, help="evaluate the first N data only"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:I")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the draws")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    try:
        with runlock.scope("evaluate"):  # a read-only run: one line, no traceback
            summary = _evaluate(args)
    except PyroVAEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


def _evaluate(args: argparse.Namespace) -> dict:
    """Evaluate the run of ``args``, holding its lock while it writes the results."""
    device = resolve_device(args.device)
    run = load(args.run_dir, device)
    model, guide, cfg = run
    rundir.claim(args.run_dir, "evaluate")  # no fit or evaluate may write it now
    rundir.check_relative_data(cfg, args.run_dir)
    splits = load_run_data(cfg, device)
    rundir.check_same_data(
        Path(args.run_dir) / "checkpoint.pt",
        {"data_dim": run.data_dim},
        splits,
        cfg.data_path or f"--dataset {cfg.dataset}",
    )
    binarize = cfg.resolved_binarize()
    x = evaluation_split(splits, args.split, binarize)
    if args.n is not None:
        x = x[: args.n]
    return evaluate_split(
        model,
        guide,
        x,
        args.run_dir,
        k=args.k,
        seed=args.seed,
        split=args.split,
        binarization=rundir.binarization_note(binarize),
    )


if __name__ == "__main__":
    sys.exit(main())
