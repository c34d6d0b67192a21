"""``python -m pyro_vae.evaluate RUN_DIR``: log p(x) of a run, per datum.

Loads ``RUN_DIR/checkpoint.pt``, estimates log p̂(x) per datum with K importance
samples (``--method is``, checking ELBO ≤ IWAE_k ≤ log p̂(x)), by annealed importance
sampling (``--method ais``) or both, optionally measures AIS's error by BDMC on data
simulated from the model (``--bdmc N``), and writes ``evaluation.json``,
``evaluation.nc`` and the figures into the run directory
(:mod:`pyro_vae.cli.evaluation`).

``--devices N`` (and ``--num-nodes M``) shard the data over N processes per node:
when this process was not started by ``torchrun``, it starts ``torchrun`` with the
same arguments and waits (:func:`pyro_vae.training.distributed.launch`). Each process
scores its shard (:mod:`pyro_vae.cli.evaluation_sharded`); rank 0 locks the run
directory, gathers the per-datum results, runs BDMC and writes the files, with the
numbers of a one-process run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from pyro_vae.cli import rundir, runlock
from pyro_vae.cli.config import resolve_device
from pyro_vae.cli.evaluation import format_summary, write_evaluation
from pyro_vae.cli.evaluation_ais import METHODS, AISOptions, run_bdmc
from pyro_vae.cli.evaluation_sharded import DATA_CHUNK, estimate_sharded
from pyro_vae.cli.loading import TrainedVAE, load, load_run_data
from pyro_vae.data import evaluation_split
from pyro_vae.errors import CommandParser, ConfigError, PyroVAEError
from pyro_vae.memory import format_bytes, machine_memory
from pyro_vae.training import distributed
from pyro_vae.training.distributed import DistContext

__all__ = ["build_parser", "main"]

T = TypeVar("T")


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
    parser.add_argument(
        "--data-chunk",
        type=_positive,
        default=DATA_CHUNK,
        help="importance sampling: data per pass, each with a float64 buffer of its K "
        "weights; the draws follow it, so keep it to compare runs",
    )
    parser.add_argument(
        "--devices",
        type=_positive,
        default=1,
        help="processes per node, each scoring a shard of the data (torchrun; each "
        "takes cuda:LOCAL_RANK on CUDA); the numbers equal one process's",
    )
    parser.add_argument(
        "--num-nodes",
        type=_positive,
        default=1,
        help="nodes of a multi-node run; each node needs MASTER_ADDR, MASTER_PORT (of "
        "node 0) and NODE_RANK in its environment, and the run directory",
    )
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
        type=_at_least_two,
        default=defaults.chains,
        help="AIS (and BDMC): chains per datum (>= 2)",
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
    """Run the CLI; returns the exit status.

    With ``--devices`` or ``--num-nodes`` above 1 it starts ``torchrun`` and returns
    its status; in a process ``torchrun`` started, only rank 0 prints the summary.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.devices * args.num_nodes > 1 and ":" in args.device:
            parser.fail(
                f"--device {args.device} names one GPU; with several processes use "
                "--device cuda (each process takes cuda:LOCAL_RANK) or auto"
            )
    except SystemExit as stop:
        return int(stop.code or 0)
    if distributed.needs_launch(args.devices, args.num_nodes):
        return _launch(argv, args)
    try:
        with runlock.scope("evaluate"):  # a read-only run: one line, no traceback
            summary = _evaluate(args)
    except PyroVAEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if summary is not None:  # None: a process other than rank 0, its shard done
        print(format_summary(summary))
    return 0


def _launch(argv: list[str], args: argparse.Namespace) -> int:
    """Run this command on ``args.devices`` processes per node through torchrun."""
    processes = args.devices * args.num_nodes
    try:
        device = resolve_device(args.device)
        if device.type == "cuda" and torch.cuda.device_count() < args.devices:
            raise ConfigError(
                f"--devices {args.devices} on CUDA needs {args.devices} GPUs on this "
                f"node; torch sees {torch.cuda.device_count()}. Lower --devices, or "
                "evaluate on the CPU with --device cpu"
            )
        load(args.run_dir, "cpu")  # a path that is no run: one line, no torchrun
        status = distributed.launch(
            argv, args.devices, args.num_nodes, module="pyro_vae.evaluate"
        )
    except PyroVAEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if status:
        how = f"(torchrun exit status {status})"
        if status in (130, 143):
            how = "on " + signal.Signals(status - 128).name
        print(
            f"error: evaluating {args.run_dir} on {processes} processes stopped "
            f"{how}; the messages above say which process stopped and why",
            file=sys.stderr,
        )
    return status


def _evaluate(args: argparse.Namespace) -> dict | None:
    """Evaluate the run of ``args``, holding its lock while it writes the results.

    In a process ``torchrun`` started, every process scores its shard; rank 0 alone
    locks the run directory, writes the files and returns the summary, the others
    return None.
    """
    device = resolve_device(args.device)
    ctx = None
    if distributed.launched() and int(os.environ["WORLD_SIZE"]) > 1:
        ctx = distributed.init_from_env(device, args.seed)
        device = ctx.device
    options = AISOptions(
        args.ais_steps, args.chains, args.leapfrog, args.bdmc, args.bdmc_steps
    )
    try:
        _check_world(args, ctx)
        model, guide, x, binarize = _load(args, device, ctx)
        estimates = estimate_sharded(
            ctx,
            model,
            guide,
            x,
            method=args.method,
            k=args.k,
            seed=args.seed,
            options=options,
            data_chunk=args.data_chunk,
        )
    finally:
        if ctx is not None:
            ctx.close()
    if estimates is None:
        return None
    # BDMC's simulated data are few: rank 0 runs it alone, as it writes the files
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


def _check_world(args: argparse.Namespace, ctx: DistContext | None) -> None:
    """Refuse --devices x --num-nodes that differ from the processes running."""
    asked, world = args.devices * args.num_nodes, 1 if ctx is None else ctx.world_size
    if asked not in (1, world):  # 1: torchrun started by hand, without the flags
        raise ConfigError(
            f"--devices {args.devices} x --num-nodes {args.num_nodes} ask for {asked} "
            f"processes, but {world} run; start it with python -m pyro_vae.evaluate "
            "(which launches torchrun itself), or make torchrun's --nproc-per-node "
            "and --nnodes agree with the flags"
        )


def _load(
    args: argparse.Namespace, device: torch.device, ctx: DistContext | None
) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, str]:
    """The run's model and guide, the data to evaluate, and their binarization.

    Rank 0 loads the run and locks its directory first, so that a run that cannot
    be evaluated stops every process with rank 0's message.
    """
    loaded: list[TrainedVAE] = []

    def load_and_claim() -> None:
        loaded.append(load(args.run_dir, device))
        rundir.claim(args.run_dir, "evaluate")  # no fit or evaluate may write it now

    _on_main(ctx, load_and_claim, "loading and locking the run directory")
    run = loaded[0] if loaded else load(args.run_dir, device)
    model, guide, cfg = run
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
    return model, guide, x, binarize


def _on_main(ctx: DistContext | None, fn: Callable[[], T], what: str) -> T:
    """``fn()`` on the process that writes the run directory; its result on all."""
    return fn() if ctx is None else ctx.main_only(fn, what)


if __name__ == "__main__":
    sys.exit(main())
