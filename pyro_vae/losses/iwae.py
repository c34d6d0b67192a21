r"""The importance-weighted bound as a Pyro loss: ``Trace_IWAE``, per datum.

For each datum, K particles z_k ~ q(z|x) drawn in one vectorized pass give
(Burda, Grosse & Salakhutdinov, 2016)

.. math::
    \mathcal{L}_K(x) = E\Big[\log \frac{1}{K} \sum_{k=1}^K w_k\Big], \qquad
    w_k = \frac{p(x, z_k)}{q(z_k \mid x)},

with ELBO = L_1 <= L_K <= L_{K+1} <= log p(x). The loss is -Σ_n L_K(x_n) over the
batch (times the data plate's scale), summed over data like ``Trace_ELBO``'s, so the
trainer's division by the batch size gives nats per datum.

**Gradients** (w̃_k = w_k / Σ_j w_j, the normalized weights; z_k = g_φ(ε_k)):

* ``"reparam"``: the gradient of the estimate, Σ_k w̃_k ∇ log w_k, for the model's
  parameters θ and the guide's φ alike (Burda et al. 2016). Its
  signal-to-noise ratio for φ falls like 1/√K (Rainforth et al. 2018).
* ``"dreg"``: doubly reparameterized gradients (Tucker, Lawson, Gu & Maddison
  2019). The guide's parameters get

  .. math::
      \nabla_\phi \mathcal{L}_K = E\Big[\sum_k \tilde w_k^2\,
      \frac{\partial \log w_k}{\partial z_k}\,\frac{\partial z_k}{\partial \phi}\Big],

  an unbiased estimate of the same gradient: the score term -∂_φ log q_φ(z)|_z,
  whose variance grows with K, is reparameterized a second time into a path term,
  which turns the weights w̃ into w̃² (dropping the score term at weights w̃, the
  "IWAE-STL" estimator, is biased; tests/test_iwae.py shows it). The model's
  parameters get Σ_k w̃_k ∇_θ log p_θ(x, z_k), as above.
  The surrogate is Σ_{k,n} ⊥(w̃ − w̃²) log p_θ(x, ⊥z) + ⊥(w̃²) (log p(x, z) −
  log q_⊥φ(z)), where ⊥ stops gradients: log q_⊥φ reruns the guide with its
  parameters detached (:func:`~pyro_vae.losses.particles.path_log_q`; the guide must
  be an ``nn.Module``) and log p_θ(x, ⊥z) reruns the model at detached z. A step
  costs one more forward pass of each network. The reported value is the bound.

**Pyro's RenyiELBO(alpha=0).** Pyro issue #3104 (martinjankowiak, 2022) says that
``RenyiELBO``'s order of summation is suboptimal or wrong for local latent variables.
What Pyro 1.9 computes: it sums each site's log-prob over the plates *not shared by
every model site* (``get_dependent_plate_dims``), then takes the log-mean-exp over
particles, then sums. In a VAE whose sites all lie in the data plate that plate is
shared, so nothing is summed first: it gives this per-datum bound summed over the
batch, the same number as ``Trace_IWAE`` on the same draws. Add one site outside the
data plate (a global latent) and the data plate is no longer shared: it becomes
log (1/K) Σ_k Π_n w_kn, one whole-batch bound, far looser for a large batch. Under
subsampling its log-weights carry the plate's scale inside the log-mean-exp.
tests/test_iwae.py shows each case from shared draws. ``Trace_IWAE`` refuses sites
outside the data plate instead (:class:`~pyro_vae.losses.particles.SiteContractError`)
and applies the scale outside.

References:
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders, ICLR,
    arXiv:1509.00519. Tucker, Lawson, Gu & Maddison (2019), Doubly Reparameterized
    Gradient Estimators for Monte Carlo Objectives, ICLR, arXiv:1810.04152.
    Rainforth et al. (2018), Tighter Variational Bounds are Not Necessarily Better,
    ICML, arXiv:1802.04537. Pyro issue #3104, https://github.com/pyro-ppl/pyro/issues/3104.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pyro_vae.losses.particles import (
    ParticleELBO,
    log_p_at_detached_z,
    particle_traces,
    path_log_q,
)

__all__ = ["IWAE_ESTIMATORS", "Trace_IWAE"]

#: gradient estimators of :class:`Trace_IWAE`
IWAE_ESTIMATORS = ("reparam", "dreg")


class Trace_IWAE(ParticleELBO):  # noqa: N801 - Pyro's naming of losses
    """The IWAE_K bound per datum (module docstring) as a :class:`pyro.infer.ELBO`.

    Args:
        num_particles: K, particles per datum, drawn in one vectorized pass inside
            ``pyro.plate("particles", K, dim=-2)``; K = 1 is ``Trace_ELBO``.
        grad_estimator: ``"reparam"`` or ``"dreg"`` (module docstring).

    Every sample site must lie in the model contract's ``pyro.plate("data", N)``
    (dim -1), and every guide site must be reparameterized.
    """

    def __init__(self, num_particles: int = 1, grad_estimator: str = "reparam") -> None:
        if grad_estimator not in IWAE_ESTIMATORS:
            raise ValueError(
                f"Trace_IWAE's grad_estimator must be one of {IWAE_ESTIMATORS}, got "
                f"{grad_estimator!r}"
            )
        super().__init__(num_particles)
        self.grad_estimator = grad_estimator

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: object, **kwargs: object
    ) -> torch.Tensor:
        """-Σ_n L_K(x_n) as a tensor whose gradient is the estimator's."""
        who = f"Trace_IWAE(grad_estimator={self.grad_estimator!r})"
        k = self.num_particles
        traces = particle_traces(model, guide, k, args, kwargs, who)
        log_w = traces.log_w  # (K, N)
        loss = -traces.scale * (log_w.logsumexp(0) - math.log(k)).sum()
        if self.grad_estimator == "reparam" or not torch.is_grad_enabled():
            return loss  # its gradient is Σ_k w̃_k ∇ log w_k
        w = torch.softmax(log_w.detach(), dim=0)
        log_p_model = log_p_at_detached_z(model, traces, who)
        log_q_path = path_log_q(guide, traces, who)
        surrogate = (w - w.square()) * log_p_model + w.square() * (
            traces.log_p - log_q_path
        )
        surrogate = -traces.scale * surrogate.sum()
        return loss.detach() + (surrogate - surrogate.detach())
