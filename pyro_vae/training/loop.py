r"""Stochastic variational inference for any (model, guide) pair.

Training maximizes the ELBO (Kingma & Welling, 2014, eq. 3),

.. math::
    \mathcal{L}(x) = E_{q(z|x)}[\log p(x, z) - \log q(z \mid x)] \le \log p(x),

by minimizing Pyro's loss, ``-ELBO`` summed over the batch, divided by the batch size:
one torch optimizer over ``elbo(model, guide)``, no global parameter store. Each step's
loss runs through :class:`pyro_vae.training.step.StepLoss` (validated once, then traced
per batch shape) and fused Adam; both leave the numbers as Pyro's eager path computes
them.

**Non-finite losses.** On CPU every loss is checked before its step, so no step is
taken on a NaN. On CUDA that check would stall the device once per step, so the
running sum is checked every :data:`SYNC_EVERY` steps and at the end of each epoch:
a few steps may be taken on a NaN, and training then stops before the epoch's
checkpoint is written, so the last good checkpoint is kept either way.

**Sign and units.** Every number this module returns is the ELBO itself (higher is
better) in nats per datum: the sum of per-datum ELBOs over a split, divided by its size.
Pyro's ``loss`` is the negative of that sum. ``Trace_ELBO`` estimates the expectation
with ``num_particles`` reparameterized draws; ``TraceMeanField_ELBO`` uses the analytic
KL(q(z|x) || p(z)) where one is registered.

**Several processes.** With ``TrainOptions.distributed`` (a
:class:`pyro_vae.training.distributed.DistContext`), each process trains on its shard of
every epoch with ``batch_size / world_size`` data per step, DDP averages the gradients,
and the epoch's train and validation sums are added over the processes; that module's
docstring gives the scaling rule. Without it, nothing changes, to the last bit.

This module imports neither :mod:`pyro_vae.models` nor :mod:`pyro_vae.guides`.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from pyro_vae.data import Splits, batches
from pyro_vae.errors import DataError, PyroVAEError
from pyro_vae.losses import TraceSTL_ELBO
from pyro_vae.training.step import StepLoss, make_optimizer

if TYPE_CHECKING:
    from pyro_vae.training.distributed import DistContext

__all__ = [
    "ELBOS",
    "MAX_PLATE_NESTING",
    "SYNC_EVERY",
    "EpochStats",
    "NonFiniteLossError",
    "Schedule",
    "TrainOptions",
    "TrainingInterrupted",
    "dataset_elbo",
    "kl_weight_at",
    "make_elbo",
    "train",
]

ELBOS: dict[str, type[ELBO]] = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}
SYNC_EVERY = 50  # steps between finiteness checks on CUDA (one host sync each)
MAX_PLATE_NESTING = 1  # the "data" plate of the model contract (pyro_vae.models.vae)


class NonFiniteLossError(PyroVAEError):
    """The loss became NaN or infinite.

    On CPU no optimizer step was taken on it; on CUDA the check lags by up to
    :data:`SYNC_EVERY` steps (module docstring).
    """


@dataclass(frozen=True)
class EpochStats:
    """One row of ``history.csv``: ELBOs in nats per datum (higher is better).

    ``train_loss`` is the objective that was minimized, per datum: -train_elbo for the
    ELBO, the InfoVAE objective for :class:`pyro_vae.losses.Trace_InfoVAE`, -IWAE_K
    for :class:`pyro_vae.losses.Trace_IWAE`. ``step`` counts optimizer steps since
    the run began.
    """

    epoch: int
    train_elbo: float
    valid_elbo: float
    seconds: float
    train_loss: float
    step: int = 0


def make_elbo(
    name: str, num_particles: int = 1, grad_estimator: str = "reparam"
) -> ELBO:
    """``Trace_ELBO`` or ``TraceMeanField_ELBO``; particles are vectorized.

    ``max_plate_nesting=1`` is the model contract (one ``"data"`` plate). Given, it
    spares Pyro's first-call guess, which draws z once more: a guess would make the
    first step of a traced, an eager and a resumed run use different draws.

    ``grad_estimator="stl"`` gives :class:`pyro_vae.losses.TraceSTL_ELBO`: the same
    ELBO (``trace`` only) with "sticking the landing" guide gradients.
    """
    if grad_estimator == "stl":
        if name != "trace":
            raise ValueError(
                "STL gradients replace the Monte Carlo log q(z|x) of Trace_ELBO; "
                f"use the trace ELBO with them, not {name!r}"
            )
        return TraceSTL_ELBO(num_particles)
    if grad_estimator != "reparam":
        raise ValueError(
            f"the ELBO's grad_estimator must be reparam or stl, got {grad_estimator!r}"
        )
    return ELBOS[name](
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=MAX_PLATE_NESTING,
    )


@torch.no_grad()
def dataset_elbo(
    loss_fn: torch.nn.Module,
    x: torch.Tensor,
    batch_size: int,
    distributed: DistContext | None = None,
) -> float:
    """Mean ELBO per datum over ``x``: ``-sum(loss over batches) / len(x)``.

    With ``distributed``, each process scores its contiguous shard of ``x`` and the
    sums are added over the processes; every process gets the same number.
    """
    shard = x if distributed is None else distributed.shard(x)
    total = torch.zeros((), device=x.device, dtype=torch.float64)
    with pyro.validation_enabled(False):  # the data were checked before training
        for batch in batches(shard, batch_size, shuffle=False):
            total += loss_fn(batch).double()
    if distributed is not None:
        return -distributed.all_sum(total)[0] / len(x)
    return -total.item() / len(x)


@dataclass(frozen=True)
class Schedule:
    """When and how much: epochs ``start_epoch..epochs`` of shuffled batches, Adam.

    Attributes:
        epochs: the last epoch to run (1-based).
        batch_size: data per optimizer step (over all processes, when distributed).
        lr: Adam's learning rate, for a new optimizer.
        start_epoch, start_step: where a resumed run picks up.
        kl_warmup: epochs over which the KL weight rises linearly from 0 to 1, step
            by step (Sønderby et al., 2016, "Ladder variational autoencoders"); 0 is
            off. The objective must carry the weight as a tensor ``kl_weight`` (e.g.
            ``Trace_InfoVAE(kl_warmup=True)``); the reported ELBOs keep weight 1.
        grad_clip: clip the global gradient norm to this value; 0 leaves it.
    """

    epochs: int
    batch_size: int
    lr: float
    start_epoch: int = 1
    start_step: int = 0
    kl_warmup: float = 0.0
    grad_clip: float = 0.0


@dataclass(frozen=True)
class TrainOptions:
    """How :func:`train` runs; none of these change the numbers.

    Attributes:
        jit: ``"auto"`` traces each step's loss once per batch shape where that is
            known to mean what eager Pyro means (the registries' parts) and runs
            other models eagerly; ``True`` traces any model; ``False`` runs Pyro
            eagerly (:class:`StepLoss`). The draws and gradients are the same
            either way; the reported loss may differ in its last digit.
        progress: show a tqdm bar over epochs.
        distributed: train on several processes (module docstring): this process
            takes its shard of each epoch, ``batch_size`` is the global batch, and
            the returned stats are over all processes. A stop request or a
            non-finite loss on any process stops all of them at the same step.
        should_stop: polled after every step; when it returns True training stops
            with :class:`TrainingInterrupted` (e.g. on SIGINT).
        on_epoch: called with each epoch's stats (e.g. to write history and
            checkpoints).
    """

    jit: bool | str = "auto"
    progress: bool = False
    distributed: DistContext | None = None
    should_stop: Callable[[], bool] | None = None
    on_epoch: Callable[[EpochStats], None] | None = None


def train(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    data: Splits,
    schedule: Schedule,
    *,
    elbo: ELBO,
    objective: ELBO | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    options: TrainOptions = TrainOptions(),  # noqa: B008 (frozen, shared safely)
) -> tuple[list[EpochStats], torch.optim.Optimizer]:
    """Train ``model`` and ``guide`` by SVI with Adam over ``schedule``'s epochs.

    Args:
        model, guide: Pyro programs taking one batch ``(B, D)``; see
            :mod:`pyro_vae.models.vae` for the contract.
        data: :class:`~pyro_vae.data.Splits` on the training device, ``(N, D)``,
            from :func:`~pyro_vae.data.binarize_splits` or
            :meth:`Splits.of(train, valid, binarization=...)
            <pyro_vae.data.Splits.of>`; under ``"dynamic"`` each training batch is
            drawn as Bernoulli(train[idx]). The test split is not used.
        schedule: epochs, batch size, learning rate, KL warm-up, clipping, and
            where a resumed run picks up (:class:`Schedule`).
        elbo: the ELBO estimator for reporting, e.g. :func:`make_elbo`; also the
            objective unless ``objective`` is given.
        objective: a different loss to minimize (e.g. InfoVAE); the ELBO of each
            training batch is then computed beside it, without gradients.
        optimizer: an optimizer to continue (a resumed run); by default a new
            (fused) Adam over the model's and guide's parameters.
        options: tracing, progress bar, processes and hooks (:class:`TrainOptions`).

    Returns:
        The history of the epochs run and the optimizer (for checkpoints).

    Raises:
        NonFiniteLossError: when a loss is NaN or inf; the step is not taken.
        TrainingInterrupted: when ``options.should_stop()`` turned True.
        pyro_vae.training.distributed.DistributedError: with
            ``options.distributed``, when another process died or hung.
    """
    if not isinstance(data, Splits):
        raise TypeError(
            f"train() takes the data as Splits, got {type(data).__name__}; wrap "
            "tensors with Splits.of(train_x, valid_x, binarization=...)"
        )
    run = _Run.start(model, guide, data, schedule, elbo, objective, optimizer, options)
    history: list[EpochStats] = []
    step = schedule.start_step
    epochs = range(schedule.start_epoch, schedule.epochs + 1)
    bar = tqdm(epochs, disable=not options.progress, unit="epoch", file=sys.stderr)
    for epoch in bar:
        stats = run.epoch(data, epoch, step, history)
        step = stats.step
        history.append(stats)
        bar.set_postfix(
            train_elbo=f"{stats.train_elbo:.2f}", valid=f"{stats.valid_elbo:.2f}"
        )
        if options.on_epoch is not None:
            options.on_epoch(stats)
    return history, run.optimizer


def _kl_weight(objective: ELBO | None, kl_warmup: float) -> torch.Tensor | None:
    """The objective's KL weight tensor, which the warm-up sets before each step."""
    if not kl_warmup:
        return None
    if not (kl_warmup > 0 and math.isfinite(kl_warmup)):
        raise ValueError(f"kl_warmup must be >= 0 epochs, got {kl_warmup}")
    weight = getattr(objective, "kl_weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(
            "kl_warmup needs an objective that weighs its KL term by a tensor "
            "kl_weight, e.g. pyro_vae.losses.Trace_InfoVAE(kl_warmup=True)"
        )
    return weight


def kl_weight_at(epoch: int, done: float, warmup: float) -> float:
    """The warm-up's KL weight after ``done`` of epoch ``epoch`` (1-based): the
    fraction of ``warmup`` epochs passed, at most 1."""
    return min(1.0, (epoch - 1 + done) / warmup)


class _Run:
    """What every step of one call of :func:`train` shares, and the epoch loop.

    The order of operations in a step (loss, finiteness, backward, agreement across
    processes, clipping, Adam) is fixed: a resumed run and tests/test_step.py rely on
    it to reproduce the plain path bit for bit.
    """

    def __init__(
        self,
        *,
        loss_fn: torch.nn.Module,
        elbo_fn: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        reports_elbo: bool,
        schedule: Schedule,
        options: TrainOptions,
        check_each_step: bool,
        kl_weight: torch.Tensor | None = None,
    ) -> None:
        self.loss_fn, self.elbo_fn, self.optimizer = loss_fn, elbo_fn, optimizer
        self.kl_weight, self.kl_warmup = kl_weight, schedule.kl_warmup
        jit, distributed = options.jit, options.distributed
        self.step_loss: Callable[[torch.Tensor], torch.Tensor] = StepLoss(
            loss_fn, jit=jit
        )
        # a different objective is minimized: its batches' ELBO is computed beside it
        self.step_elbo = None if reports_elbo else StepLoss(elbo_fn, jit=jit)
        self.batch_size = self.step_batch = schedule.batch_size
        self.grad_clip, self.should_stop = schedule.grad_clip, options.should_stop
        self.distributed, self.check_each_step = distributed, check_each_step
        if distributed is not None:  # DDP averages the gradients of every backward()
            self.step_loss = distributed.data_parallel(
                self.step_loss, loss_fn, options.should_stop
            )
            self.step_batch = distributed.local_batch_size(schedule.batch_size)

    @classmethod
    def start(
        cls,
        model: torch.nn.Module,
        guide: torch.nn.Module,
        data: Splits,
        schedule: Schedule,
        elbo: ELBO,
        objective: ELBO | None,
        optimizer: torch.optim.Optimizer | None,
        options: TrainOptions,
    ) -> _Run:
        """The losses of ``(model, guide)``, their optimizer and the KL weight."""
        elbo_fn = elbo(model, guide)
        loss_fn = elbo_fn if objective is None else objective(model, guide)
        return cls(
            loss_fn=loss_fn,
            elbo_fn=elbo_fn,
            optimizer=optimizer or make_optimizer(loss_fn.parameters(), schedule.lr),
            reports_elbo=objective is None,
            schedule=schedule,
            options=options,
            check_each_step=data.train.device.type == "cpu",
            kl_weight=_kl_weight(objective, schedule.kl_warmup),
        )

    def epoch(
        self, data: Splits, epoch: int, step: int, history: list[EpochStats]
    ) -> EpochStats:
        """One pass over ``data.train`` (this process's shard), then its statistics."""
        start = time.perf_counter()
        self.loss_fn.train()  # train mode for every network in the model and guide
        total_loss, total_elbo, seen, step = self._pass(data, epoch, step, history)
        self.loss_fn.eval()
        n_train = len(data.train)
        dist = self.distributed
        if dist is not None:  # sums over every process's shard
            summed = dist.all_sum(total_loss, total_elbo, seen)
            total_loss, total_elbo = torch.tensor(summed[:2], dtype=torch.float64)
            n_train = round(summed[2])
        lagged = not self.check_each_step
        _check_finite(total_loss, epoch, step, history, lagged=lagged)
        if dist is not None:  # after the NaN check: a NaN explains a mismatch
            dist.check_in_sync(self.loss_fn, epoch)
        if self.step_elbo is None:
            total_elbo = -total_loss
        return EpochStats(
            epoch=epoch,
            train_elbo=total_elbo.item() / n_train,
            valid_elbo=dataset_elbo(self.elbo_fn, data.valid, self.batch_size, dist),
            seconds=time.perf_counter() - start,
            train_loss=total_loss.item() / n_train,
            step=step,
        )

    def _pass(
        self, data: Splits, epoch: int, step: int, history: list[EpochStats]
    ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The optimizer steps of one epoch: this process's sums of the loss and of
        the ELBO over its batches, the data it saw, and the last step's number."""
        train_x, dist = data.train, self.distributed
        order = None if dist is None else dist.shard_order(len(train_x), epoch)
        dynamic = data.binarization == "dynamic"
        shuffled = batches(
            train_x, self.step_batch, shuffle=True, dynamic=dynamic, order=order
        )
        n_batches = -(
            -(len(train_x) if order is None else len(order)) // self.step_batch
        )
        total_loss = torch.zeros((), device=train_x.device, dtype=torch.float64)
        total_elbo = torch.zeros_like(total_loss)
        seen = 0
        for i, x in enumerate(shuffled):
            step += 1
            seen += len(x)
            if self.kl_weight is not None:
                with torch.no_grad():
                    self.kl_weight.fill_(
                        kl_weight_at(epoch, i / n_batches, self.kl_warmup)
                    )
            loss, stop = self._step(x, epoch, step, history)
            total_loss += loss.detach().double()
            if self.step_elbo is not None:
                with torch.no_grad():
                    total_elbo -= self.step_elbo(x).double()
            if dist is None:
                if not self.check_each_step and step % SYNC_EVERY == 0:
                    _check_finite(total_loss, epoch, step, history, lagged=True)
                stop = self.should_stop is not None and self.should_stop()
            if stop:
                raise TrainingInterrupted(epoch, step)
        return total_loss, total_elbo, seen, step

    def _step(
        self, x: torch.Tensor, epoch: int, step: int, history: list[EpochStats]
    ) -> tuple[torch.Tensor, bool]:
        """One optimizer step on batch ``x``: its loss, and whether to stop after it."""
        dist = self.distributed
        loss = _loss(self.step_loss, x)
        if (self.check_each_step and dist is None) or not loss.requires_grad:
            _check_finite(loss, epoch, step, history)  # (no graph: validation's NaN)
        self.optimizer.zero_grad(set_to_none=True)
        (loss / len(x)).backward()
        stop = False
        if dist is not None and (self.check_each_step or step % SYNC_EVERY == 0):
            finite, stop = dist.agree()  # the same answer on every process
            if not finite:
                raise _non_finite(
                    f"not finite on at least one of the {dist.world_size} processes",
                    epoch,
                    step,
                    history,
                    lagged=not self.check_each_step,
                )
        if self.grad_clip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        return loss, stop


class TrainingInterrupted(PyroVAEError):
    """Training was asked to stop (a signal) in the middle of an epoch."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"training interrupted at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


def _loss(
    step_loss: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """The batch loss; a NaN that validation catches becomes a NaN loss.

    Pyro's own "Encountered NaN" warning is silenced: :func:`_check_finite` stops
    training with a message that says what to do. Data outside a distribution's
    support are not a NaN: they raise :class:`DataError` saying so.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)
            return step_loss(x)
    except ValueError as err:
        text = str(err)
        if "within the support" in text:
            raise DataError(
                "a training batch lies outside the support of a distribution in the "
                f"model ({text.splitlines()[0]}). Data in [0, 1] for a Bernoulli "
                "likelihood must be binarized: pass the Splits from "
                "binarize_splits(splits, 'dynamic') to train(), or "
                "Splits.of(..., binarization='dynamic'); otherwise choose a "
                "likelihood whose support holds the data"
            ) from None
        # Under validation a NaN reaches a distribution's parameters first, and
        # torch refuses them ("... but found invalid values"): the same failure.
        if "found invalid values" not in text:
            raise
        return torch.tensor(float("nan"), device=x.device)


def _check_finite(
    loss: torch.Tensor,
    epoch: int,
    step: int,
    history: list[EpochStats],
    lagged: bool = False,
) -> None:
    if not torch.isfinite(loss):
        raise _non_finite(str(loss.item()), epoch, step, history, lagged)


def _non_finite(
    value: str, epoch: int, step: int, history: list[EpochStats], lagged: bool
) -> NonFiniteLossError:
    last = f"{history[-1].train_elbo:.4f}" if history else "none (first epoch)"
    where = (
        f"in the steps up to epoch {epoch}, step {step} (checked every {SYNC_EVERY} "
        "steps on CUDA; the last good checkpoint is kept)"
        if lagged
        else f"at epoch {epoch}, step {step}; no step was taken on it"
    )
    return NonFiniteLossError(
        f"the loss is {value} {where}. Last finite train ELBO per datum: "
        f"{last}. Lower --lr, or check the data and the likelihood's scale floor."
    )
