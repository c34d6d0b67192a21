"""The module DistributedDataParallel wraps: the loss's parameters plus two flags.

The flags' gradients carry each process's loss and stop request; DDP averages them
with the real gradients, so every process learns, at no extra collective, whether any
loss was not finite or any process was asked to stop
(:meth:`pyro_vae.training.distributed.DistContext.agree` reads them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["Replica"]


class Replica(torch.nn.Module):
    """What DDP wraps: ``loss_fn``'s parameters, plus two flags that share news.

    ``forward`` returns ``loss + (flags * [loss, stop]).sum()`` with ``flags`` zero,
    so the value is the loss (for finite losses, exactly), and the gradient of
    ``flags`` is ``[loss, stop]`` times the caller's scale; DDP averages it with the
    others, so a NaN on any process, or any stop request, reaches every process.
    """

    def __init__(
        self,
        step_loss: Callable[[torch.Tensor], torch.Tensor],
        loss_fn: torch.nn.Module,
        should_stop: Callable[[], bool] | None,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.flags = torch.nn.Parameter(torch.zeros(2, device=device))
        self._step_loss = step_loss
        self._should_stop = should_stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            loss = self._step_loss(x)
        except ValueError as err:  # validation met a NaN: share it, as train() does
            if "found invalid values" not in str(err):
                raise
            loss = self.flags.new_full((), float("nan"))
        stop = float(self._should_stop is not None and bool(self._should_stop()))
        news = torch.stack(
            [loss.detach().to(self.flags.dtype), self.flags.new_full((), stop)]
        )
        return loss + (self.flags * news).sum().to(loss.dtype)
