"""Turn the command line's loss flags into a Pyro loss object."""

from __future__ import annotations

from pyro.infer import ELBO

from pyro_vae.losses.infovae import PRESETS, infovae_preset
from pyro_vae.losses.kernels import KERNELS, MULTI_SCALES, Kernel

__all__ = ["LOSSES", "make_kernel", "make_objective"]

LOSSES = tuple(PRESETS)


def make_kernel(name: str, bandwidth: str) -> Kernel:
    """``name`` is ``rbf``, ``imq`` or either with ``-multi``; ``bandwidth`` is
    ``dim``, ``median`` or a positive number sigma (a fixed scale 2 sigma^2)."""
    base, _, multi = name.partition("-")
    if base not in KERNELS or multi not in ("", "multi"):
        raise ValueError(
            f"unknown kernel {name!r}; choose rbf, imq, rbf-multi or imq-multi"
        )
    scales = MULTI_SCALES if multi else (1.0,)
    if bandwidth in ("dim", "median"):
        return Kernel(base, bandwidth, 1.0, scales)
    try:
        sigma = float(bandwidth)
    except ValueError:
        sigma = -1.0
    if not 0 < sigma < float("inf"):
        raise ValueError(
            "--bandwidth must be dim, median or a positive finite number, got "
            f"{bandwidth!r}"
        )
    return Kernel(base, "fixed", sigma, scales)


def make_objective(
    loss: str,
    *,
    alpha: float,
    lam: float,
    beta: float,
    kernel: str,
    bandwidth: str,
    num_particles: int = 1,
    kl_warmup: bool = False,
) -> ELBO:
    """The InfoVAE-family loss named ``loss`` (see :data:`PRESETS`).

    ``kl_warmup``: weigh the KL term by a tensor ``kl_weight`` that a warm-up sets.
    """
    return infovae_preset(
        loss,
        alpha=alpha,
        lam=lam,
        beta=beta,
        kernel=make_kernel(kernel, bandwidth),
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=1,  # the model contract's "data" plate; no first-call guess
        kl_warmup=kl_warmup,
    )
