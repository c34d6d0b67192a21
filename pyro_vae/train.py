r"""Stochastic variational inference for any (model, guide) pair.

Training maximizes the ELBO (Kingma & Welling, 2014, eq. 3),

.. math::
    \mathcal{L}(x) = E_{q(z|x)}[\log p(x, z) - \log q(z \mid x)] \le \log p(x),

by minimizing Pyro's loss, ``-ELBO`` summed over the batch, divided by the batch size:
one torch optimizer over ``elbo(model, guide)``, no global parameter store.

**Sign and units.** Every number this module returns is the ELBO itself (higher is
better) in nats per datum: the sum of per-datum ELBOs over a split, divided by its size.
Pyro's ``loss`` is the negative of that sum. ``Trace_ELBO`` estimates the expectation
with ``num_particles`` reparameterized draws; ``TraceMeanField_ELBO`` uses the analytic
KL(q(z|x) || p(z)) where one is registered.

This module imports neither :mod:`pyro_vae.models` nor :mod:`pyro_vae.guides`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from pyro_vae.data import batches
from pyro_vae.errors import PyroVAEError

__all__ = [
    "ELBOS",
    "EpochStats",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "dataset_elbo",
    "make_elbo",
    "train",
]

ELBOS: dict[str, type[ELBO]] = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}


class NonFiniteLossError(PyroVAEError):
    """The loss became NaN or infinite; no optimizer step was taken on it."""


@dataclass(frozen=True)
class EpochStats:
    """One row of ``history.csv``: ELBOs in nats per datum (higher is better).

    ``train_loss`` is the objective that was minimized, per datum: -train_elbo for the
    ELBO, the InfoVAE objective for :class:`pyro_vae.losses.Trace_InfoVAE`. ``step``
    counts optimizer steps since the run began.
    """

    epoch: int
    train_elbo: float
    valid_elbo: float
    seconds: float
    train_loss: float
    step: int = 0


def make_elbo(name: str, num_particles: int = 1) -> ELBO:
    """``Trace_ELBO`` or ``TraceMeanField_ELBO``; particles are vectorized."""
    return ELBOS[name](
        num_particles=num_particles, vectorize_particles=num_particles > 1
    )


@torch.no_grad()
def dataset_elbo(loss_fn: torch.nn.Module, x: torch.Tensor, batch_size: int) -> float:
    """Mean ELBO per datum over ``x``: ``-sum(loss over batches) / len(x)``."""
    total = torch.zeros((), device=x.device, dtype=torch.float64)
    for batch in batches(x, batch_size, shuffle=False):
        total += loss_fn(batch).double()
    return -total.item() / len(x)


def train(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    train_x: torch.Tensor,
    valid_x: torch.Tensor,
    *,
    elbo: ELBO,
    epochs: int,
    batch_size: int,
    lr: float,
    objective: ELBO | None = None,
    dynamic_binarization: bool = False,
    progress: bool = False,
    on_epoch: Callable[[EpochStats], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start_epoch: int = 1,
    start_step: int = 0,
    grad_clip: float = 0.0,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[EpochStats], torch.optim.Optimizer]:
    """Train ``model`` and ``guide`` by SVI with Adam, epochs start_epoch..epochs.

    Args:
        model, guide: Pyro programs taking one batch ``(B, D)``; see
            :mod:`pyro_vae.models.vae` for the contract.
        train_x, valid_x: data on the training device, ``(N, D)``.
        elbo: the ELBO estimator for reporting, e.g. :func:`make_elbo`; also the
            objective unless ``objective`` is given.
        epochs, batch_size, lr: the schedule; batches are shuffled indices.
        objective: a different loss to minimize (e.g. InfoVAE); the ELBO of each
            training batch is then computed beside it, without gradients.
        dynamic_binarization: draw each training batch as Bernoulli(train_x[idx]).
        progress: show a tqdm bar over epochs.
        on_epoch: called with each epoch's stats (e.g. to write history and
            checkpoints).
        optimizer: an optimizer to continue (a resumed run); by default a new Adam
            over the model's and guide's parameters.
        start_epoch, start_step: where a resumed run picks up.
        grad_clip: clip the global gradient norm to this value; 0 leaves it.
        should_stop: polled after every step; when it returns True training stops
            with :class:`TrainingInterrupted` (e.g. on SIGINT).

    Returns:
        The history of the epochs run and the optimizer (for checkpoints).

    Raises:
        NonFiniteLossError: when a loss is NaN or inf; the step is not taken.
        TrainingInterrupted: when ``should_stop()`` turned True.
    """
    elbo_fn = elbo(model, guide)
    loss_fn = elbo_fn if objective is None else objective(model, guide)
    optimizer = optimizer or torch.optim.Adam(loss_fn.parameters(), lr=lr)
    history: list[EpochStats] = []
    step = start_step
    epoch_range = range(start_epoch, epochs + 1)
    bar = tqdm(epoch_range, disable=not progress, unit="epoch", file=sys.stderr)
    for epoch in bar:
        start = time.perf_counter()
        loss_fn.train()  # train mode for every network in the model and guide
        total_loss = torch.zeros((), device=train_x.device, dtype=torch.float64)
        total_elbo = torch.zeros_like(total_loss)
        for x in batches(
            train_x, batch_size, shuffle=True, dynamic=dynamic_binarization
        ):
            step += 1
            loss = _loss(loss_fn, x, epoch, step, history)
            optimizer.zero_grad(set_to_none=True)
            (loss / len(x)).backward()
            if grad_clip:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            total_loss += loss.detach().double()
            if objective is not None:
                with torch.no_grad():
                    total_elbo -= elbo_fn(x).double()
            if should_stop is not None and should_stop():
                raise TrainingInterrupted(epoch, step)
        loss_fn.eval()
        if objective is None:
            total_elbo = -total_loss
        stats = EpochStats(
            epoch=epoch,
            train_elbo=total_elbo.item() / len(train_x),
            valid_elbo=dataset_elbo(elbo_fn, valid_x, batch_size),
            seconds=time.perf_counter() - start,
            train_loss=total_loss.item() / len(train_x),
            step=step,
        )
        history.append(stats)
        bar.set_postfix(
            train_elbo=f"{stats.train_elbo:.2f}", valid=f"{stats.valid_elbo:.2f}"
        )
        if on_epoch is not None:
            on_epoch(stats)
    return history, optimizer


class TrainingInterrupted(PyroVAEError):
    """Training was asked to stop (a signal) in the middle of an epoch."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"training interrupted at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


def _loss(
    loss_fn: torch.nn.Module,
    x: torch.Tensor,
    epoch: int,
    step: int,
    history: list[EpochStats],
) -> torch.Tensor:
    """The batch loss, checked finite before any optimizer step may use it."""
    try:
        loss = loss_fn(x)
    except ValueError as err:
        # Under validation a NaN reaches a distribution's parameters first, and
        # torch refuses them ("... but found invalid values"): the same failure.
        if "found invalid values" not in str(err):
            raise
        loss = torch.tensor(float("nan"))
    _check_finite(loss, epoch, step, history)
    return loss


def _check_finite(
    loss: torch.Tensor, epoch: int, step: int, history: list[EpochStats]
) -> None:
    if torch.isfinite(loss):
        return
    last = f"{history[-1].train_elbo:.4f}" if history else "none (first epoch)"
    raise NonFiniteLossError(
        f"the loss is {loss.item()} at epoch {epoch}, step {step}; no step was taken "
        f"on it. Last finite train ELBO per datum: {last}. Lower --lr, or check the "
        "data and the likelihood's scale floor."
    )
