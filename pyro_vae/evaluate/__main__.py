"""``python -m pyro_vae.evaluate RUN_DIR``: importance-sampled log p(x) of a run.

Loads ``RUN_DIR/checkpoint.pt``, estimates log p̂(x) per datum with K importance
samples, checks ELBO ≤ IWAE_k ≤ log p̂(x), and writes ``evaluation.json``,
``evaluation.nc`` and two figures into the run directory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pyro_vae.config import resolve_device
from pyro_vae.data import evaluation_split
from pyro_vae.errors import PyroVAEError
from pyro_vae.evaluate.report import evaluate_split, format_summary
from pyro_vae.loading import load_run, load_run_data
from pyro_vae.rundir import binarization_note

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pyro_vae.evaluate",
        description="Importance-sampled log p(x), per datum, of a trained run, in "
        "nats per datum (higher is better).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run_dir", help="a run directory written by pyro_vae.fit")
    parser.add_argument(
        "--k", type=_at_least_two, default=5000, help="K, samples per datum (>= 2)"
    )
    parser.add_argument(
        "--split", choices=("test", "valid", "train"), default="test", help="data split"
    )
    parser.add_argument(
        "--n", type=_at_least_two, default=None, help="evaluate the first N data only"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:I")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    try:
        device = resolve_device(args.device)
        model, guide, cfg = load_run(args.run_dir, device)
        splits = load_run_data(cfg, device)
        binarize = cfg.resolved_binarize()
        x = evaluation_split(splits, args.split, binarize)
        if args.n is not None:
            x = x[: args.n]
        summary = evaluate_split(
            model,
            guide,
            x,
            args.run_dir,
            k=args.k,
            seed=args.seed,
            split=args.split,
            binarization=binarization_note(binarize),
        )
    except PyroVAEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
