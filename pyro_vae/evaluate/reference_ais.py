r"""A hand-written, batched, pure-torch AIS with HMC for the built-in MLP VAE.

The estimating pass of :func:`pyro_vae.evaluate.annealing.anneal` for one specific
VAE, written without Pyro and without the annealing module's loop: the potential and
its gradients are written out by hand. On the path from q(z | x) to p(z | x),

.. math::
    \log f_\beta(z) = (1 - \beta) \log q(z \mid x) + \beta \log p(x, z),

with q(z | x) = N(μ(x), diag σ(x)²), σ = softplus(·) + floor (the guide's encoder),
p(z) = N(0, I) and p(x | z) Bernoulli on logits l = f(z) (or Gaussian with a fixed
σ_x), the gradients are

.. math::
    \nabla \log q = -(z - \mu) / \sigma^2, \qquad
    \nabla \log p(z) = -z, \qquad
    \nabla \log p(x \mid z) = J_f(z)^\top (x - \mathrm{sigmoid}(l))
    \;\; \text{or} \;\; J_f(z)^\top (x - f(z)) / \sigma_x^2,

the last one a vector-Jacobian product through the decoder (one backward pass). μ(x)
and σ(x) do not depend on z, so the encoder runs once. Each chain weighs
:math:`\log w = \sum_t (\beta_t - \beta_{t-1}) (\log p(x, z_{t-1}) - \log q(z_{t-1}
\mid x))` and moves by one HMC transition (identity mass, full momentum refresh,
leapfrog steps, Metropolis accept; Neal, 2011) leaving :math:`f_{\beta_t}` invariant.

The momenta and accept draws follow the counter convention of
:class:`pyro_vae.evaluate.annealing.Noise` (draw ``(stream · 1000003 + t) · 2 + kind``,
kind 0 the momentum, 1 the uniform), and ε is read from the frozen bin of the
position t / T, so that from the same starting points, step sizes and keys it gives
the log-weights of ``anneal`` with the Pyro potential up to float rounding. It is the
yardstick of ``benchmarks/bench_ais.py`` and an independent check of the HMC maths
(``tests/test_reference_ais.py``).

References:
    Neal (2001), Annealed importance sampling, Statistics and Computing 11.
    Neal (2011), MCMC using Hamiltonian dynamics, Handbook of MCMC, ch. 5.
    Wu, Burda, Salakhutdinov & Grosse (2017), On the quantitative analysis of
    decoder-based generative models, ICLR.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pyro_vae.evaluate.annealing import betas
from pyro_vae.rng import counter_normal, counter_uniform

__all__ = ["mlp_vae_ais"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_STREAM_STRIDE = 1_000_003  # annealing.Noise's counter layout


class _Potential:
    """log q, log p(x, z) and their gradients in z for the MLP VAE at fixed x."""

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        x: torch.Tensor,
        scale_floor: float,
        sigma: float | None,
    ) -> None:
        with torch.no_grad():
            loc, raw = encoder(x).chunk(2, dim=-1)
            self.loc, self.scale = loc, F.softplus(raw) + scale_floor
        self.inv_var = self.scale.square().reciprocal()
        self.log_q_const = -(self.scale.log() + _HALF_LOG_2PI).sum(-1)  # (N,)
        self.decoder, self.x, self.sigma = decoder, x, sigma
        d, big_d = loc.shape[-1], x.shape[-1]
        self.log_prior_const = -d * _HALF_LOG_2PI
        if sigma is not None:
            self.log_lik_const = -big_d * (math.log(sigma) + _HALF_LOG_2PI)

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(log q, log p(x, z), ∇ log q, ∇ log p(x, z)) at z ``(chains, N, d)``."""
        diff = z - self.loc
        base = self.log_q_const - 0.5 * (diff.square() * self.inv_var).sum(-1)
        g_base = -diff * self.inv_var
        with torch.enable_grad():
            z_in = z.detach().requires_grad_(True)
            out = self.decoder(z_in)
            with torch.no_grad():
                x = self.x.expand_as(out)
                if self.sigma is None:  # Bernoulli on logits
                    log_lik = -F.binary_cross_entropy_with_logits(
                        out, x, reduction="none"
                    ).sum(-1)
                    d_out = x - torch.sigmoid(out)
                else:  # Gaussian with a fixed σ_x
                    d_out = (x - out) / self.sigma**2
                    log_lik = self.log_lik_const - 0.5 * (
                        (x - out) * (1.0 / self.sigma)
                    ).square().sum(-1)
            (g_lik,) = torch.autograd.grad(out, z_in, grad_outputs=d_out)
        target = self.log_prior_const - 0.5 * z.square().sum(-1) + log_lik
        return base, target, g_base, g_lik - z


@torch.no_grad()
def mlp_vae_ais(
    encoder: nn.Module,
    decoder: nn.Module,
    x: torch.Tensor,
    *,
    steps: int,
    leapfrog: int,
    step_sizes: torch.Tensor,
    u0: torch.Tensor,
    keys: torch.Tensor,
    stream: int,
    scale_floor: float,
    sigma: float | None = None,
    schedule: str = "sigmoid",
) -> torch.Tensor:
    """AIS log-weights ``(chains, N)``, float64, of the MLP VAE with a N(0, I) prior.

    Args:
        encoder: x ``(N, D)`` -> ``(N, 2d)``: mean, then the softplus-input of σ.
        decoder: z ``(chains, N, d)`` -> logits (Bernoulli) or means (Gaussian).
        x: data ``(N, D)``.
        steps: T, the number of intermediate distributions.
        leapfrog: leapfrog steps per HMC transition.
        step_sizes: frozen ε ``(bins, chains, N)``; transition t uses bin
            ``min(bins - 1, int(t / T · bins))``, as :class:`.annealing.StepSizes`.
        u0: starting states ``(chains, N, d)``, draws of q(z | x).
        keys: the data's counter keys ``(N,)`` (:func:`pyro_vae.rng.datum_keys`).
        stream: the pass's counter stream (``ESTIMATE`` = 2 in :mod:`.ais`).
        scale_floor: the guide's σ floor: σ = softplus(·) + floor.
        sigma: None for a Bernoulli likelihood, else the Gaussian's fixed σ_x.
        schedule: the β schedule, a name of :data:`.annealing.SCHEDULES`.
    """
    potential = _Potential(encoder, decoder, x, scale_floor, sigma)
    beta = [float(b) for b in betas(steps, schedule)]
    bins = step_sizes.shape[0]
    z = u0
    base, target, g_base, g_target = potential(z)
    log_w = torch.zeros(base.shape, dtype=torch.float64, device=z.device)
    for t in range(1, steps + 1):
        log_w += ((beta[t] - beta[t - 1]) * (target - base)).double()
        if t == steps:
            break
        b = beta[t]
        eps = step_sizes[min(bins - 1, int(t / steps * bins))][..., None]
        counter = (stream * _STREAM_STRIDE + t) * 2
        m = counter_normal(keys, counter, z.shape, z.dtype)
        uniform = counter_uniform(keys, counter + 1, base.shape, base.dtype)
        # Leapfrog: half step in p, L full steps in z with full p steps between.
        p = m + 0.5 * eps * (g_base + b * (g_target - g_base))
        zn = z
        for step in range(leapfrog):
            zn = zn + eps * p
            bn, tn, gbn, gtn = potential(zn)
            scale = eps if step < leapfrog - 1 else 0.5 * eps
            p = p + scale * (gbn + b * (gtn - gbn))
        h_old = -(base + b * (target - base)) + 0.5 * m.square().sum(-1)
        h_new = -(bn + b * (tn - bn)) + 0.5 * p.square().sum(-1)
        log_alpha = (h_old - h_new).clamp(max=0.0)
        finite = torch.isfinite(log_alpha) & torch.isfinite(zn).all(-1)
        alpha = torch.where(finite, log_alpha.exp(), torch.zeros_like(log_alpha))
        accept = uniform < alpha
        a = accept[..., None]
        z = torch.where(a, zn, z)
        base = torch.where(accept, bn, base)
        target = torch.where(accept, tn, target)
        g_base = torch.where(a, gbn, g_base)
        g_target = torch.where(a, gtn, g_target)
    return log_w
