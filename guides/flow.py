r"""Amortized Normal guide followed by conditional inverse autoregressive flow steps.

.. math::
    z_0 \sim N\big(\mu_\phi(x), \operatorname{diag} \sigma_\phi(x)^2\big), \qquad
    z_k = s_k(z_{k-1}, h) \odot z_{k-1} + m_k(z_{k-1}, h), \quad k = 1..K,

    \log q_\phi(z_K \mid x) = \log N(z_0; \mu, \sigma^2)
        - \sum_{k=1}^K \sum_i \log s_{k,i}(z_{k-1}, h),

where :math:`(m_k, \log s_k)` is a masked autoregressive network (MADE) of
:math:`z_{k-1}` and the context :math:`h = h_\phi(x)`, so its Jacobian is triangular.
With K = 0 this is the diagonal guide. Closed-form KL: none for K >= 1 (use a Monte
Carlo ELBO); for K = 0, :meth:`FlowGuide.posterior` is the diagonal Normal itself,
with its KL against Normal priors.
"""

from __future__ import annotations

import warnings

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn

from pyro_vae.guides.base import AmortizedGuide
from pyro_vae.guides.gaussian import check_guide_args
from pyro_vae.nn import softplus_floor

__all__ = ["FlowGuide"]


class FlowGuide(AmortizedGuide):
    r"""q(z|x): a diagonal Normal pushed through K conditional IAF steps.

    The encoder maps x ``(N, D)`` to ``(N, 2d + c)``: mu, the softplus-input of sigma
    (``sigma = softplus(.) + floor`` as in
    :class:`~pyro_vae.guides.DiagonalNormalGuide`), and the context h ``(N, c)`` that
    every flow step is conditioned on (``c = 0`` when K = 0). Step k is Pyro's
    ``ConditionalAffineAutoregressive`` on a ``ConditionalAutoRegressiveNN``.

    Between steps the variables are reordered: the autoregressive order of step k is
    the identity for even k and reversed for odd k, passed to the network as its
    ``permutation`` (stored there as a buffer, so it is saved and fixed). This does
    the job of a ``Permute`` transform between steps, without a final permutation to
    undo and without drawing a random order from the global RNG.

    Sampling is reparameterized. The log-density of a sample is exact and cheap:
    each step caches its last (input, output) pair, so ``log_prob`` of the value it
    just drew needs no inversion. A value the flow did not draw is inverted
    coordinate by coordinate (d network passes per step).

    The context broadcasts over extra leading sample dims: inside a particle plate
    z is ``(P, N, d)`` and the network expands h ``(N, c)`` to ``(P, N, c)``.

    Args:
        encoder: a network from ``(N, D)`` to ``(N, 2 * latent_dim + context_dim)``.
        latent_dim: d.
        flow_steps: K >= 0.
        context_dim: c, the width of h; by default 2d (0 when K = 0).
        hidden_dims: hidden widths of each step's network; by default ``(10 d,)``,
            Pyro's own default. Each must be at least d.
        scale_floor: the smallest standard deviation of the base Normal.

    References:
        Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling (2016), Improved
        Variational Inference with Inverse Autoregressive Flow, arXiv:1606.04934
        (the context h, eq. 10-11). Germain, Gregor, Murray & Larochelle (2015),
        MADE: Masked Autoencoder for Distribution Estimation, arXiv:1502.03509.
    """

    def __init__(
        self,
        encoder: nn.Module,
        latent_dim: int,
        flow_steps: int = 2,
        context_dim: int | None = None,
        hidden_dims: tuple[int, ...] | None = None,
        scale_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        check_guide_args(latent_dim, scale_floor)
        if flow_steps < 0:
            raise ValueError(f"flow_steps must be non-negative, got {flow_steps}")
        self.encoder = encoder
        self.latent_dim, self.scale_floor = latent_dim, scale_floor
        self.context_dim = self.default_context_dim(latent_dim, flow_steps, context_dim)
        hidden = list(hidden_dims or (10 * latent_dim,))
        self.transforms = nn.ModuleList(
            self._step(k, hidden) for k in range(flow_steps)
        )

    @staticmethod
    def default_context_dim(
        latent_dim: int, flow_steps: int, context_dim: int | None = None
    ) -> int:
        """c: ``context_dim`` if given, else 2d; always 0 when there are no steps."""
        if flow_steps == 0:
            return 0
        return 2 * latent_dim if context_dim is None else context_dim

    def _step(self, k: int, hidden: list[int]) -> ConditionalAffineAutoregressive:
        d = self.latent_dim
        order = torch.arange(d) if k % 2 == 0 else torch.arange(d - 1, -1, -1)
        with warnings.catch_warnings():
            # with d = 1 a step is an affine map whose shift and scale depend on h
            # alone; that is intended, so Pyro's note about it is not shown
            warnings.filterwarnings("ignore", "ConditionalAutoRegressiveNN input_dim")
            arn = ConditionalAutoRegressiveNN(
                d, self.context_dim, hidden, permutation=order
            )
        return ConditionalAffineAutoregressive(arn)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return (mu ``(N, d)``, sigma ``(N, d)``, h ``(N, c)``)."""
        d = self.latent_dim
        loc, raw_scale, context = self.encoder(x).split(
            [d, d, self.context_dim], dim=-1
        )
        return loc, softplus_floor(raw_scale, self.scale_floor), context

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z|x): batch shape ``(N,)``, event shape ``(d,)``.

        A ``TransformedDistribution`` whose transforms are freshly conditioned on
        h(x); with K = 0, the base ``Normal(mu, sigma).to_event(1)`` itself.
        """
        loc, scale, context = self.encode(x)
        base = dist.Normal(loc, scale).to_event(1)
        if not self.transforms:
            return base
        steps = [t.condition(context) for t in self.transforms]
        return dist.TransformedDistribution(base, steps)
