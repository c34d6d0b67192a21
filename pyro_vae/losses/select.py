"""Turn the command line's loss flags into a Pyro loss object, and name it."""

from __future__ import annotations

from pyro.infer import ELBO

from pyro_vae.losses.infovae import PRESETS, infovae_preset
from pyro_vae.losses.iwae import Trace_IWAE
from pyro_vae.losses.kernels import KERNELS, MULTI_SCALES, Kernel

__all__ = [
    "GRAD_ESTIMATORS",
    "LOSSES",
    "describe_objective",
    "make_kernel",
    "make_objective",
]

#: ``--loss``: the InfoVAE family's presets, and the IWAE bound
LOSSES = (*PRESETS, "iwae")
#: ``--grad-estimator``: reparam for every loss, dreg for iwae, stl for elbo
GRAD_ESTIMATORS = ("reparam", "dreg", "stl")


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
    grad_estimator: str = "reparam",
) -> ELBO:
    """The loss named ``loss``: ``iwae``, or one of the InfoVAE family's
    :data:`PRESETS`.

    ``kl_warmup``: weigh the KL term by a tensor ``kl_weight`` that a warm-up sets
    (not for ``iwae``, which has no KL term). ``grad_estimator``: ``reparam``, or
    ``dreg`` for ``iwae``; STL is an estimator of the plain ELBO
    (:func:`pyro_vae.training.loop.make_elbo`).
    """
    if loss == "iwae":
        if kl_warmup:
            raise ValueError(
                "the IWAE bound has no KL term for a warm-up to weigh; drop the "
                "KL warm-up or use an ELBO-family loss"
            )
        return Trace_IWAE(num_particles, grad_estimator)
    if grad_estimator != "reparam":
        raise ValueError(
            f"grad_estimator {grad_estimator!r} is not available for loss {loss!r}: "
            "dreg is for iwae, stl for the plain ELBO (make_elbo('trace', "
            "grad_estimator='stl')); use reparam"
        )
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


def describe_objective(loss: str, num_particles: int, grad_estimator: str) -> str:
    """What a run minimizes, in words, e.g. ``IWAE_5 bound per datum, DReG
    gradients`` (for ``metrics.json`` and the summary)."""
    how = {"reparam": "reparameterized", "dreg": "DReG", "stl": "STL"}
    gradients = f"{how.get(grad_estimator, grad_estimator)} gradients"
    if loss == "iwae":
        return (
            f"IWAE_{num_particles} bound per datum (Trace_IWAE, Burda et al. 2016), "
            f"{gradients}"
        )
    particles = f"{num_particles} particle(s) per datum"
    if loss == "elbo":
        return f"ELBO, {particles}, {gradients}"
    return f"{loss} objective (Trace_InfoVAE), {particles}, {gradients}"
