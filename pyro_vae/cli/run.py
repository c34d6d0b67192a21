"""One training session: set up, train with checkpoints, survive signals, finish.

``run(cfg)`` starts a run directory; ``run(cfg, resume=RUN_DIR)`` continues one from
its ``checkpoint.pt``. At the end of every epoch a snapshot of the training state
(:mod:`pyro_vae.training.state`) is taken; every ``checkpoint_every`` epochs, and at the
end, it is written atomically. SIGINT (Ctrl-C) and SIGTERM stop training after the
current
step: the last epoch's snapshot is written and :class:`Interrupted` carries the exit
status (130, 143). A non-finite loss stops training the same way, after writing the
last good snapshot. Resuming restores weights, optimizer and every RNG, so a resumed
run computes the same numbers as an uninterrupted one.

Inside a process that ``torchrun`` started (``WORLD_SIZE`` > 1) the run is one of
several data-parallel processes (:mod:`pyro_vae.training.distributed`): all of them
train, rank 0 alone writes the run directory, checkpoints, figures and report and runs
the
final evaluation; the others leave once training is done. A resumed run loads rank
0's checkpoint on every process; it continues, but is not bit-exact (the processes
re-seed from the epoch they start at). If a process dies, the others stop with
:class:`pyro_vae.training.distributed.DistributedError` and rank 0 writes the last
finished epoch's checkpoint.

The checks before training live in :mod:`pyro_vae.cli.preflight`, the end of the run
(final ELBOs, evaluation, figures, report) in :mod:`pyro_vae.cli.finish`.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pyro
import torch
from pyro.infer import ELBO
from torch.nn import Module
from torch.optim import Optimizer
from tqdm.auto import tqdm

from pyro_vae.cli import rundir, runlock
from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig, resolve_device
from pyro_vae.cli.finish import TrainedRun, finish_run
from pyro_vae.cli.loading import load_run_data, state_mismatch
from pyro_vae.cli.preflight import check_closed_form_kl, check_support
from pyro_vae.data import Splits
from pyro_vae.errors import ConfigError, PyroVAEError
from pyro_vae.losses import make_objective
from pyro_vae.training import distributed
from pyro_vae.training.checkpoint import load_checkpoint
from pyro_vae.training.distributed import DistContext, DistributedError
from pyro_vae.training.loop import (
    EpochStats,
    NonFiniteLossError,
    Schedule,
    TrainingInterrupted,
    TrainOptions,
    make_elbo,
    train,
)
from pyro_vae.training.state import restore_rng, snapshot
from pyro_vae.training.step import make_optimizer

__all__ = ["Interrupted", "run"]

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
T = TypeVar("T")


class Interrupted(PyroVAEError):
    """Training stopped on a signal; a checkpoint was written. ``status``: 130/143."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@contextmanager
def _stop_on_signals() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM instead of dying, so training can stop cleanly."""
    caught: list[int] = []

    def handler(signum: int, frame: object) -> None:
        caught.append(signum)

    previous = {sig: signal.getsignal(sig) for sig in EXIT_STATUS}
    try:
        for sig in EXIT_STATUS:
            signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave the signals alone
        previous = {}
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@runlock.scoped  # the run directory stays locked until this returns or raises
def run(cfg: FitConfig, resume: str | Path | None = None) -> Path:
    """Train the VAE ``cfg`` describes, or continue ``resume``; write its files.

    In a process started by ``torchrun`` it trains together with the others (module
    docstring); every process returns the run directory.
    """
    started = time.perf_counter()
    pyro.settings.set(module_local_params=True)
    pyro.set_rng_seed(cfg.seed)
    device = resolve_device(cfg.device)
    ctx = None
    if distributed.launched() and int(os.environ["WORLD_SIZE"]) > 1:
        ctx = distributed.init_from_env(device, cfg.seed)
        device = ctx.device
    try:
        cfg = _check_world(cfg, ctx)
        cfg, trained = _setup_and_train(cfg, resume, device, ctx)
    finally:
        if ctx is not None:
            ctx.close()
    if ctx is not None and not ctx.is_main:
        return trained.out
    return finish_run(cfg, trained, device, started)


def _check_world(cfg: FitConfig, ctx: DistContext | None) -> FitConfig:
    """The config with the real number of processes; refuse a mismatch."""
    asked = cfg.devices * cfg.num_nodes
    world = 1 if ctx is None else ctx.world_size
    if asked == world:
        return cfg
    if ctx is not None and asked == 1:  # torchrun started without --devices
        nodes, rest = divmod(world, ctx.local_world_size)
        if not rest:
            return dataclasses.replace(
                cfg, devices=ctx.local_world_size, num_nodes=nodes
            )
        return cfg
    raise ConfigError(
        f"--devices {cfg.devices} x --num-nodes {cfg.num_nodes} ask for {asked} "
        f"processes, but {world} run; start it with python -m pyro_vae.fit (which "
        "launches torchrun itself), or make torchrun's --nproc-per-node and --nnodes "
        "agree with the flags"
    )


def _setup_and_train(
    cfg: FitConfig,
    resume: str | Path | None,
    device: torch.device,
    ctx: DistContext | None,
) -> tuple[FitConfig, TrainedRun]:
    """Data, parts, run directory or checkpoint, then training; on every process."""
    main = ctx is None or ctx.is_main
    binarize = cfg.resolved_binarize()
    if resume is None:  # so that evaluate and --resume find the data from anywhere
        cfg = rundir.absolute_paths(cfg)
    else:
        rundir.check_relative_data(cfg, resume)
        cfg = _named_where_it_is(cfg, Path(resume))
    splits = load_run_data(cfg, device)
    if cfg.batch_size > len(splits.train):
        raise ConfigError(
            f"--batch-size {cfg.batch_size} exceeds the {len(splits.train)} training "
            f"data of {cfg.dataset}; use at most {len(splits.train)}"
        )
    model, guide = build_model_and_guide(cfg, splits.data_dim, splits.image_shape)
    model, guide = model.to(device, torch.float32), guide.to(device, torch.float32)
    check_support(model.likelihood, splits, binarize)
    if cfg.elbo == "meanfield":
        check_closed_form_kl(model, guide, splits.valid[:2], cfg)
    optimizer = make_optimizer(torch.nn.ModuleList([model, guide]).parameters(), cfg.lr)
    if ctx is not None:
        ctx.local_batch_size(cfg.batch_size)  # refuse an uneven split up front
    out = None if resume is None else Path(resume)
    if out is not None:  # one writer: lock it before reading what to continue
        _on_main(ctx, lambda: rundir.claim(out, "fit"), "locking the run directory")
    if out is None or _never_saved(out):  # a new run, or one that starts over
        state = snapshot(model, guide, optimizer, 0, 0)
        out = _on_main(ctx, lambda: rundir.create(cfg, out), "creating the run dir")
    else:
        state = _restore(out, model, guide, optimizer, cfg, rewrite=main, splits=splits)
        if main:
            (out / "config.json").write_text(cfg.to_json() + "\n")
    if ctx is not None:  # independent draws per process from here on
        ctx.seed_rngs(cfg.seed, state["epoch"])
    history = _train_with_checkpoints(
        cfg, model, guide, optimizer, splits, out, state, ctx
    )
    return cfg, TrainedRun(model, guide, splits, out, history)


def _on_main(ctx: DistContext | None, fn: Callable[[], T], what: str) -> T:
    """``fn()`` on the process that writes the run directory; its result on all."""
    return fn() if ctx is None else ctx.main_only(fn, what)


def _never_saved(out: Path) -> bool:
    """A run stopped before its first checkpoint: resuming starts it over."""
    return not (out / "checkpoint.pt").exists() and (out / "config.json").is_file()


def _named_where_it_is(cfg: FitConfig, out: Path) -> FitConfig:
    """A resumed run's config names the directory it is in now (it may have moved)."""
    if cfg.out is not None and os.path.realpath(cfg.out) == os.path.realpath(out):
        return cfg
    return dataclasses.replace(cfg, out=str(out))


def _restore(
    out: Path,
    model: Module,
    guide: Module,
    optimizer: Optimizer,
    cfg: FitConfig,
    rewrite: bool = True,
    splits: Splits | None = None,
) -> dict:
    """Load the checkpoint of ``out`` into the parts; return its snapshot.

    ``rewrite``: check ``config.json`` and ``history.csv`` against the checkpoint and
    cut the history back to its epoch (rank 0 does; the other processes of a
    distributed run need only the checkpoint). ``splits``: the data, checked against
    those the checkpoint was trained on.
    """
    payload = load_checkpoint(out / "checkpoint.pt")
    _check_resumable(out, payload, model, guide, cfg, splits)
    _load_state(out, payload, model, guide, optimizer, cfg)
    if rewrite:
        _cut_history(out, payload)
    return {
        key: payload[key]
        for key in ("model", "guide", "optimizer", "epoch", "step", "rng")
    }


def _check_resumable(
    out: Path,
    payload: dict,
    model: Module,
    guide: Module,
    cfg: FitConfig,
    splits: Splits | None,
) -> None:
    """Refuse a checkpoint past ``--epochs``, of other data, or of other networks."""
    checkpoint = out / "checkpoint.pt"
    done = payload.get("epoch")
    if isinstance(done, int) and done > cfg.epochs:
        raise ConfigError(
            f"{out} has trained {done} epochs already; --epochs {cfg.epochs} cannot "
            f"take them back. Resume with --epochs {done} or more, or start a new "
            "run (--out)"
        )
    if splits is not None:
        source = cfg.data_path or f"--dataset {cfg.dataset}"
        rundir.check_same_data(checkpoint, payload, splits, source)
    for part, name in ((model, "model"), (guide, "guide")):
        problem = state_mismatch(part, payload.get(name), name)
        if problem is not None:
            raise ConfigError(
                f"{out / 'checkpoint.pt'} does not fit this run's networks: {problem}"
            )


def _load_state(
    out: Path,
    payload: dict,
    model: Module,
    guide: Module,
    optimizer: Optimizer,
    cfg: FitConfig,
) -> None:
    """Load weights, optimizer (at this run's ``--lr``) and every RNG."""
    try:
        model.load_state_dict(payload["model"])
        guide.load_state_dict(payload["guide"])
        optimizer.load_state_dict(payload["optimizer"])
        for group in optimizer.param_groups:  # --lr may change on resume
            group["lr"] = cfg.lr
        restore_rng(payload["rng"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise ConfigError(
            f"{out / 'checkpoint.pt'} does not fit this run's networks or lacks "
            f"resume state ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None


def _cut_history(out: Path, payload: dict) -> None:
    """Check config.json and history.csv against the checkpoint; cut to its epoch."""
    rundir.check_config_agrees(out, payload.get("config"))
    try:
        rows = rundir.read_history(out, payload["epoch"])
    except (OSError, KeyError, ValueError) as err:
        raise ConfigError(
            f"{out / 'history.csv'} is missing or unreadable "
            f"({type(err).__name__}: {str(err).splitlines()[0]}); a run cannot "
            "resume without it: start a new run (--out)"
        ) from None
    rundir.check_history(out, rows, payload["epoch"], payload["step"])
    rundir.rewrite_history(out, rows)


def _train_with_checkpoints(
    cfg: FitConfig,
    model: Module,
    guide: Module,
    optimizer: Optimizer,
    splits: Splits,
    out: Path,
    state: dict,
    ctx: DistContext | None = None,
) -> list[EpochStats]:
    """Train from ``state`` to ``cfg.epochs``, checkpointing; stop on signals.

    With ``ctx``, every process trains; only rank 0 writes history and checkpoints,
    and only it returns the history (the others return an empty list).
    """
    main = ctx is None or ctx.is_main
    run_state = RunState(cfg, out, splits, main, last=state)
    on_epoch = _epoch_hook(run_state, model, guide, optimizer)
    with _stop_on_signals() as caught:
        try:
            train(
                model,
                guide,
                splits,
                Schedule(
                    epochs=cfg.epochs,
                    batch_size=cfg.batch_size,
                    lr=cfg.lr,
                    start_epoch=state["epoch"] + 1,
                    start_step=state["step"],
                    kl_warmup=cfg.kl_warmup,
                    grad_clip=cfg.grad_clip,
                ),
                elbo=_elbo(cfg),
                objective=_objective(cfg),
                optimizer=optimizer,
                options=TrainOptions(
                    jit="auto" if cfg.jit else False,
                    progress=main and not cfg.quiet and sys.stderr.isatty(),
                    distributed=ctx,
                    should_stop=lambda: bool(caught),
                    on_epoch=on_epoch,
                ),
            )
        except TrainingInterrupted as stop:
            raise _interrupted(stop, caught, run_state) from None
        except NonFiniteLossError as err:
            raise _non_finite(err, run_state) from None
        except RuntimeError as err:  # DistributedError is a ValueError: not here
            lost = None if ctx is None else ctx.lost_contact(err, "training")
            if lost is None:
                raise
            raise _lost(lost, run_state) from None
        except DistributedError as err:
            raise _lost(err, run_state) from None
    return rundir.read_history(out) if main else []


@dataclasses.dataclass
class RunState:
    """The run's state while it trains: the latest end-of-epoch snapshot, its home."""

    cfg: FitConfig
    out: Path
    splits: Splits
    main: bool  # this process writes the run directory (rank 0)
    last: dict  # the latest end-of-epoch snapshot: what a stop writes

    @property
    def epoch(self) -> int:
        """The epoch the latest snapshot ends."""
        return self.last["epoch"]

    def save(self) -> Path:
        """Rank 0 writes the last snapshot; the checkpoint's path on every rank."""
        if self.main:
            return rundir.save_checkpoint(self.out, self.cfg, self.last, self.splits)
        return self.out / "checkpoint.pt"


def _epoch_hook(
    run_state: RunState, model: Module, guide: Module, optimizer: Optimizer
) -> Callable[[EpochStats], None]:
    """What ends an epoch: its history line, a snapshot, and a checkpoint when due."""
    cfg, out = run_state.cfg, run_state.out

    def on_epoch(stats: EpochStats) -> None:
        """Remember (rank 0: record and maybe save) the epoch that just ended."""
        if not run_state.main:  # rank 0 saves this epoch; the others remember which
            run_state.last = {"epoch": stats.epoch}
            return
        _report_epoch(out, stats, cfg)
        run_state.last = snapshot(model, guide, optimizer, stats.epoch, stats.step)
        if stats.epoch % cfg.checkpoint_every == 0 or stats.epoch == cfg.epochs:
            rundir.save_checkpoint(out, cfg, run_state.last, run_state.splits)

    return on_epoch


def _interrupted(
    stop: TrainingInterrupted, caught: list[int], run_state: RunState
) -> Interrupted:
    """Save the last snapshot; the error that says so and carries the exit status."""
    path = run_state.save()
    # with several processes, a stop caught by another one stops this one too
    sig = signal.Signals(caught[0]) if caught else signal.SIGTERM
    return Interrupted(
        f"{sig.name}: {stop}. Saved {path} at the end of "
        f"epoch {run_state.epoch}; resume with: python -m pyro_vae.fit "
        f"--resume {shlex.quote(str(run_state.out))}",
        EXIT_STATUS[sig],
    )


def _non_finite(err: NonFiniteLossError, run_state: RunState) -> NonFiniteLossError:
    """Save the last good snapshot; ``err`` with where it is and how to go on."""
    path = run_state.save()
    return NonFiniteLossError(
        f"{err} The last good state (end of epoch {run_state.epoch}) is in "
        f"{path}; resume with --resume {shlex.quote(str(run_state.out))} "
        "--lr SMALLER, or --grad-clip."
    )


def _lost(err: DistributedError, run_state: RunState) -> DistributedError:
    """Save the last snapshot; ``err`` with where it is and how to go on.

    Only rank 0 knows the epoch it saved; the other ranks do not know which
    checkpoint rank 0 managed to write.
    """
    path, out = run_state.save(), run_state.out
    epoch = run_state.epoch if run_state.main else None
    where = (
        f"Rank 0 keeps the checkpoints in {path}"
        if epoch is None
        else f"The last finished epoch ({epoch}) is saved in {path}"
    )
    return DistributedError(
        f"{err}. {where}; resume with: python -m pyro_vae.fit --resume "
        f"{shlex.quote(str(out))}"
    )


def _elbo(cfg: FitConfig) -> ELBO:
    """The ELBO reported every epoch (``--elbo``); also the objective for ``--loss
    elbo``, with STL gradients under ``--grad-estimator stl``."""
    estimator = cfg.grad_estimator if cfg.loss == "elbo" else "reparam"
    return make_elbo(cfg.elbo, cfg.num_particles, estimator)


def _objective(cfg: FitConfig) -> ELBO | None:
    """None for the plain ELBO (:func:`_elbo`), else the IWAE bound or the
    InfoVAE-family loss, with ``--grad-estimator``'s gradients.

    With ``--kl-warmup`` even the ELBO becomes a Trace_InfoVAE at (α, λ) = (0, 1),
    whose KL weight is a tensor the warm-up sets each step.
    """
    if cfg.loss == "elbo" and not cfg.kl_warmup:
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
            kl_warmup=cfg.kl_warmup > 0,
            grad_estimator=cfg.grad_estimator,
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
