r"""The ELBO with "sticking the landing" gradients: ``TraceSTL_ELBO``.

The value is the Monte Carlo ELBO of ``Trace_ELBO`` with K vectorized particles,

.. math::
    \mathcal{L}(x) = \frac{1}{K} \sum_{k=1}^K \log p(x, z_k) - \log q_\phi(z_k \mid x),
    \qquad z_k = g_\phi(\epsilon_k, x).

The reparameterized gradient of a draw splits into a path term and a score term,

.. math::
    \nabla_\phi \big[\log p(x, z) - \log q_\phi(z \mid x)\big]
    = \frac{\partial [\log p(x, z) - \log q_\phi(z \mid x)]}{\partial z}
      \frac{\partial z}{\partial \phi}
    - \nabla_\phi \log q_\phi(z \mid x)\big|_{z},

and the score term has expectation zero. STL (Roeder, Wu & Duvenaud 2017)
drops it: the surrogate scores z under the guide with its parameters detached
(:func:`~pyro_vae.losses.particles.path_log_q`; the guide must be an ``nn.Module``),
so the guide's gradient flows only through z. The estimator is unbiased, and when
q(z|x) is the exact posterior, log p(x, z) - log q(z|x) = log p(x) does not depend on
z, so the guide's gradient is exactly zero for every draw. The model's parameters get
the ordinary gradient Σ_k ∇_θ log p_θ(x, z_k) / K. A step costs one more forward
pass of the guide's network.

References:
    Roeder, Wu & Duvenaud (2017), Sticking the Landing: Simple, Lower-Variance
    Gradient Estimators for Variational Inference, NeurIPS, arXiv:1703.09194.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyro_vae.losses.particles import ParticleELBO, particle_traces, path_log_q

__all__ = ["TraceSTL_ELBO"]


class TraceSTL_ELBO(ParticleELBO):  # noqa: N801 - Pyro's naming of losses
    """The ELBO with path-derivative (STL) guide gradients (module docstring).

    Args:
        num_particles: K, particles per datum, drawn in one vectorized pass inside
            ``pyro.plate("particles", K, dim=-2)``.

    Every sample site must lie in the model contract's ``pyro.plate("data", N)``,
    and every guide site must be reparameterized.
    """

    def __init__(self, num_particles: int = 1) -> None:
        super().__init__(num_particles)

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: object, **kwargs: object
    ) -> torch.Tensor:
        """-ELBO summed over the batch, as a tensor with the STL gradient."""
        who = "TraceSTL_ELBO"
        traces = particle_traces(model, guide, self.num_particles, args, kwargs, who)
        loss = -traces.scale * traces.log_w.mean(0).sum()
        if not torch.is_grad_enabled():
            return loss
        log_q_path = path_log_q(guide, traces, who)
        surrogate = -traces.scale * (traces.log_p - log_q_path).mean(0).sum()
        return loss.detach() + (surrogate - surrogate.detach())
