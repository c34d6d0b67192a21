"""``python -m pyro_vae.evaluate RUN_DIR``: log p(x) of a run, per datum.

Loads ``RUN_DIR/checkpoint.pt``, estimates log p̂(x) per datum with K importance
samples (``--method is``, checking ELBO ≤ IWAE_k ≤ log p̂(x)), by annealed importance
sampling (``--method ais``) or both, optionally measures AIS's error by BDMC on data
simulated from the model (``--bdmc N``), and writes ``evaluation.json``,
``evaluation.nc`` and the figures into the run directory
(:mod:`pyro_vae.cli.evaluation`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pyro_vae.cli import rundir, runlock
from pyro_vae.cli.config import resolve_device
from pyro_vae.cli.evaluation import estimate, format_summary, write_evaluation
from pyro_vae.cli.evaluation_ais import METHODS, AISOptions, run_bdmc
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


def _ais_steps(text: str) -> int:
    """``--ais-steps``: at least 2; one step has no transition."""
    value = _positive(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            "must be at least 2: one step has no transition (it is importance "
            "sampling with --chains draws; use --method is)"
        )
    return value


def _count(text: str) -> int:
    """``--bdmc``: 0 (skip), or at least 2 data (one gives no standard error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 0 (skip) or a number of data >= 2, got {text!r}"
        ) from None
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(
            f"must be 0 (skip) or a number of data >= 2, got {value}"
        )
    return value


def _steps_list(text: str) -> tuple[int, ...]:
    """``--bdmc-steps``: a comma list of whole numbers >= 2, e.g. ``100,1000``."""
    try:
        steps = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a comma list of whole numbers >= 2, e.g. 100,1000; got {text!r}"
        ) from None
    if min(steps) < 2:
        raise argparse.ArgumentTypeError(
            f"every entry must be >= 2 (one step has no transition to test), got "
            f"{text!r}"
        )
    return steps


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
        description="log p(x), per datum, of a trained run by importance sampling "
        "and/or annealed importance sampling, in nats per datum (higher is better).",
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
    _add_ais_arguments(parser)
    return parser


def _add_ais_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = AISOptions()
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="is",
        help="is: importance sampling (K = --k); ais: annealed importance sampling; "
        "both: both, compared per datum",
    )
    parser.add_argument(
        "--ais-steps",
        type=_ais_steps,
        default=defaults.steps,
        help="AIS: intermediate distributions from the guide to p(z|x) (>= 2)",
    )
    parser.add_argument(
        "--chains",
        type=_positive,
        default=defaults.chains,
        help="AIS (and BDMC): chains per datum",
    )
    parser.add_argument(
        "--leapfrog",
        type=_positive,
        default=defaults.leapfrog,
        help="AIS (and BDMC): leapfrog steps per HMC transition",
    )
    parser.add_argument(
        "--bdmc",
        type=_count,
        default=defaults.bdmc,
        metavar="N",
        help="BDMC: bound AIS's error on N data simulated from the model; 0 skips it",
    )
    parser.add_argument(
        "--bdmc-steps",
        type=_steps_list,
        default=defaults.bdmc_steps,
        metavar="S1,S2,...",
        help="BDMC: the AIS steps to sandwich at, a comma list",
    )


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
    options = AISOptions(
        args.ais_steps, args.chains, args.leapfrog, args.bdmc, args.bdmc_steps
    )
    # the per-datum estimates of x, then the files: data could be split between
    estimates = estimate(
        model, guide, x, method=args.method, k=args.k, seed=args.seed, options=options
    )
    sandwich = run_bdmc(model, guide, options, seed=args.seed, device=device)
    return write_evaluation(
        model,
        guide,
        x,
        args.run_dir,
        estimates,
        sandwich,
        seed=args.seed,
        split=args.split,
        binarization=rundir.binarization_note(binarize),
    )


if __name__ == "__main__":
    sys.exit(main())
