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
from pyro.infer import ELBO
from pyro.infer.util import torch_item

from pyro_vae.losses.particles import particle_traces, path_log_q

__all__ = ["TraceSTL_ELBO"]


class TraceSTL_ELBO(ELBO):  # noqa: N801 - Pyro's naming of losses
    """The ELBO with path-derivative (STL) guide gradients (module docstring).

    Args:
        num_particles: K, particles per datum, drawn in one vectorized pass inside
            ``pyro.plate("particles", K, dim=-2)``.

    Every sample site must lie in the model contract's ``pyro.plate("data", N)``,
    and every guide site must be reparameterized.
    """

    def __init__(self, num_particles: int = 1) -> None:
        if not (isinstance(num_particles, int) and num_particles >= 1):
            raise ValueError(
                f"TraceSTL_ELBO needs num_particles >= 1, got {num_particles!r}"
            )
        super().__init__(num_particles=num_particles, max_plate_nesting=1)

    def _get_trace(self, model, guide, args, kwargs):  # noqa: ANN001, ANN202
        """Pyro's hook for one trace pair; unused, as all K particles are drawn at
        once (:func:`~pyro_vae.losses.particles.particle_traces`)."""
        raise NotImplementedError(
            "TraceSTL_ELBO draws its particles in one vectorized trace"
        )

    def loss(
        self, model: Callable, guide: Callable, *args: object, **kwargs: object
    ) -> float:
        """-ELBO summed over the batch, a float."""
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(
        self, model: Callable, guide: Callable, *args: object, **kwargs: object
    ) -> float:
        """The loss, with the STL gradients accumulated (for ``SVI``)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)

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
