"""Priors p(z): modules whose ``forward()`` returns a distribution with event_dim 1.

A prior is called with no arguments inside the model's data plate, and returns a
distribution whose ``event_shape`` is ``(latent_dim,)`` and whose batch shape is
``()``; the plate broadcasts it over the data. A prior with learnable parameters
registers them as ordinary module parameters, so they train with everything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_vae.nn import registry_entry, softplus_floor

from .likelihood_base import inverse_softplus_floor

__all__ = [
    "PRIORS",
    "LearnedNormalPrior",
    "MixtureOfGaussiansPrior",
    "ReparameterizedMixture",
    "StandardNormalPrior",
    "StudentTPrior",
    "VampPrior",
]


class StandardNormalPrior(PyroModule):
    """p(z) = N(0, I_d), the AEVB prior (Kingma & Welling, 2014, section 3).

    Args:
        latent_dim: d, the size of z.
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        _check_dim(latent_dim)
        self.latent_dim = latent_dim
        # Buffers, not parameters: they follow .to(device) but are never trained.
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class LearnedNormalPrior(PyroModule):
    """p(z) = N(mu, diag sigma^2) with learned mu and sigma = softplus(rho) + floor.

    Args:
        latent_dim: d.
        floor: the smallest sigma.
    """

    def __init__(self, latent_dim: int, floor: float = 1e-3) -> None:
        super().__init__()
        _check_dim(latent_dim)
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.rho = nn.Parameter(
            torch.full((latent_dim,), inverse_softplus_floor(1.0, floor))
        )
        self.floor = floor

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, softplus_floor(self.rho, self.floor)).to_event(1)


class MixtureOfGaussiansPrior(PyroModule):
    """p(z) = Σ_k π_k N(z; mu_k, diag sigma_k^2), all learned.

    Means start spread as N(0, I) draws, scales at 1, weights uniform. The KL to a
    guide has no closed form: train with ``--elbo trace``. Its draws are
    reparameterized in the means and scales (:class:`ReparameterizedMixture`), so an
    MMD term trains those; the weights learn only through log p(z), i.e. from a KL
    term (alpha < 1).

    Args:
        latent_dim: d.
        components: K.
        floor: the smallest sigma.
    """

    def __init__(
        self, latent_dim: int, components: int = 10, floor: float = 1e-3
    ) -> None:
        super().__init__()
        _check_dim(latent_dim)
        if components < 1:
            raise ValueError(f"--components must be >= 1, got {components}")
        self.logits = nn.Parameter(torch.zeros(components))
        self.locs = nn.Parameter(torch.randn(components, latent_dim))
        self.rhos = nn.Parameter(
            torch.full((components, latent_dim), inverse_softplus_floor(1.0, floor))
        )
        self.floor = floor

    def forward(self) -> dist.Distribution:
        scales = softplus_floor(self.rhos, self.floor)
        return ReparameterizedMixture(
            dist.Categorical(logits=self.logits),
            dist.Normal(self.locs, scales).to_event(1),
        )


class VampPrior(PyroModule):
    """p(z) = (1/K) Σ_k q(z | u_k): the guide's posterior at K learned pseudo-inputs.

    The pseudo-inputs u_k = sigmoid(r_k) lie in (0, 1)^D like the data. The guide is
    handed in as ``posterior``, a callable x -> q(z|x) (batch (K,), event (d,)), so
    this module does not import :mod:`pyro_vae.guides`; the encoder's parameters stay
    the guide's, and the pseudo-inputs are this prior's.

    Args:
        posterior: the guide's ``posterior`` method.
        pseudo_inputs: K.
        data_dim: D.

    References:
        Tomczak & Welling (2018), VAE with a VampPrior, AISTATS, arXiv:1705.07120.
    """

    def __init__(
        self,
        posterior: Callable[[torch.Tensor], dist.Distribution],
        pseudo_inputs: int = 500,
        data_dim: int = 784,
    ) -> None:
        super().__init__()
        if pseudo_inputs < 1 or data_dim < 1:
            raise ValueError(
                f"--pseudo-inputs and the data dimension must be >= 1, got "
                f"{pseudo_inputs} and {data_dim}"
            )
        self.posterior = posterior
        # Start near grey 0.5 with a little noise, as Tomczak & Welling initialize.
        self.raw_inputs = nn.Parameter(0.1 * torch.randn(pseudo_inputs, data_dim))

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        return torch.sigmoid(self.raw_inputs)

    def forward(self) -> dist.Distribution:
        components = self.posterior(self.pseudo_inputs)
        k = self.raw_inputs.shape[0]
        return _ExpandedMixture(
            dist.Categorical(logits=self.raw_inputs.new_zeros(k)), components
        )


class ReparameterizedMixture(dist.MixtureSameFamily):
    r"""A mixture whose samples carry the pathwise gradient of its components.

    A draw is :math:`z = g_{\theta_k}(\epsilon)`: the component index
    :math:`k \sim \mathrm{Categorical}(\pi)` is drawn first, without gradient, then
    z is drawn by ``rsample`` inside component k. Conditional on k this is the
    ordinary reparameterization of component k, so for any f and component j

    .. math::
        \nabla_{\theta_j} \mathbb{E}_{p(z)} f(z)
            = \mathbb{E}_{k \sim \pi,\, \epsilon}\Big[\mathbb{1}[k = j]\,
              \nabla_z f(z)^\top \frac{\partial g_{\theta_j}(\epsilon)}
              {\partial \theta_j}\Big], \qquad z = g_{\theta_k}(\epsilon),

    so the pathwise gradient of a draw is an unbiased estimate of the gradient with
    respect to the *component* parameters :math:`\theta_j` (the means and scales of
    a Gaussian mixture; the VampPrior's pseudo-inputs through q(z | u_j)). For
    instance :math:`\partial \sum z / \partial \mu_k` is the number of draws that
    chose component k, and :math:`\partial \sum z / \partial \sigma_k` the sum of
    their standardized noise :math:`(z - \mu_k) / \sigma_k`.

    **The mixture weights get no gradient from a sample** (a stated limitation). The
    choice of k is discrete, so :math:`\partial z / \partial \pi = 0` almost
    everywhere, although :math:`\nabla_\pi \mathbb{E} f(z) \ne 0`. The two unbiased
    ways to recover it were weighed and not taken here:

    * a score-function term :math:`f(z) \nabla_\pi \log \pi_k` (Williams, 1992)
      needs the value of the downstream loss f, which a sampler cannot see: it
      belongs in the loss, and for an MMD² U-statistic of B draws it is noisy;
    * implicit reparameterization through the distributional transform (Graves,
      2016, "Stochastic backpropagation through mixture density distributions",
      arXiv:1607.05690; Figurnov, Mohamed & Mnih, 2018, "Implicit
      reparameterization gradients", NeurIPS) differentiates the chain of
      conditional CDFs :math:`F_i(z_i \mid z_{<i})` and solves a d x d triangular
      system per draw. It needs CDFs of the components, which the VampPrior's
      components (any guide, e.g. a flow) do not have.

    So under an objective that sees the prior only through its samples (MMD with
    alpha = 1) learnable weights stay where they are; :class:`pyro_vae.losses.
    Trace_InfoVAE` warns about that. Any term with log p(z) (a KL term) trains them.

    Model-side use is unchanged: under Pyro's ELBOs the model's site z is replayed
    from the guide, so neither ``sample`` nor ``rsample`` is called there and the
    ELBO and its gradients are those of :class:`~pyro.distributions.MixtureSameFamily`.
    ``rsample`` spends the random numbers ``sample`` spends, in the same order (the
    indices, then a draw from every component, then a gather), so a seeded draw is
    the same number either way. ``expand`` (Pyro's plates) keeps the class.
    """

    has_rsample = True

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """A draw of shape ``sample_shape + batch_shape + event_shape``."""
        sample_shape = torch.Size(sample_shape)
        gather_dim = len(sample_shape) + len(self.batch_shape)
        event_shape = self.event_shape
        mixture = self.mixture_distribution
        if mixture.batch_shape != self.batch_shape:  # weights shared over the batch
            mixture = mixture.expand(self.batch_shape)
        with torch.no_grad():
            index = mixture.sample(sample_shape)  # (n, B)
        draws = self.component_distribution.rsample(sample_shape)  # (n, B, K, E)
        index = index.reshape(index.shape + (1,) * (len(event_shape) + 1))
        index = index.expand(index.shape[: gather_dim + 1] + event_shape)
        return torch.gather(draws, gather_dim, index).squeeze(gather_dim)


class _ExpandedMixture(ReparameterizedMixture):
    r"""The VampPrior's mixture, with a log_prob that never broadcasts z over K.

    For diagonal Normal components (the diagonal guide's posterior) the quadratic form
    is two matrix products, with precisions :math:`\lambda_{kj} = \sigma_{kj}^{-2}`:

    .. math::
        \sum_j \lambda_{kj} (z_j - \mu_{kj})^2
            = (z \odot z)^\top \lambda_k - 2 z^\top (\mu_k \odot \lambda_k)
              + \mu_k^\top (\mu_k \odot \lambda_k),

    computed in float64, because the three terms are each far larger than their sum
    when sigma is small. This replaces a ``(..., K, d)`` tensor by ``(..., K)``: the
    K = 1000 evaluation of a 500-component VampPrior no longer runs out of memory
    bandwidth. Other components (a flow, a low-rank Normal) take the general path:
    torch's MixtureSameFamily broadcasts z ``(..., 1, d)`` against ``(K, d)``, which a
    conditional flow's inverse cannot do with its context, so z is expanded to
    ``(..., K, d)`` first.
    """

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(x)
        log_w = self.mixture_distribution.logits.log_softmax(-1)
        q = self.component_distribution
        diagonal = (
            isinstance(q, dist.Independent)
            and isinstance(q.base_dist, dist.Normal)
            and q.reinterpreted_batch_ndims == 1
        )
        if diagonal:
            loc, scale = _unexpanded(q.base_dist.loc), _unexpanded(q.base_dist.scale)
            if loc.dim() == scale.dim() == 2:
                log_q = _diagonal_normal_log_prob(x, loc, scale)
                log_p = torch.logsumexp(log_q + log_w, -1)
                shape = torch.broadcast_shapes(log_p.shape, self.batch_shape)
                return log_p.expand(shape)
        z = x.unsqueeze(-2).expand(*x.shape[:-1], log_w.shape[-1], x.shape[-1])
        log_q = q.log_prob(z)  # (..., K)
        return torch.logsumexp(log_q + log_w, -1)


def _unexpanded(t: torch.Tensor) -> torch.Tensor:
    """``t`` without the leading dims that ``expand`` added (stride 0, or size 1).

    Pyro's plates expand the prior to their batch shape, and the mixture's components
    with it: ``(K, d)`` becomes a ``(..., N, K, d)`` view of the same numbers. A new
    dim of size 1 (a batch of one) keeps a nonzero stride, so it is dropped by size.
    """
    lead = 0
    while lead < t.dim() - 2 and (t.stride(lead) == 0 or t.shape[lead] == 1):
        lead += 1
    return t[(0,) * lead]


def _diagonal_normal_log_prob(
    z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """log N(z; loc_k, diag scale_k^2) for z ``(..., d)`` and loc, scale ``(K, d)``."""
    z64, loc64, scale64 = z.double(), loc.double(), scale.double()
    precision = scale64.pow(-2)
    weighted = loc64 * precision  # (K, d)
    quad = (
        z64.pow(2) @ precision.T - 2 * (z64 @ weighted.T) + (loc64 * weighted).sum(-1)
    )
    log_norm = -scale64.log().sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
    return (log_norm - 0.5 * quad).to(z.dtype)


class StudentTPrior(PyroModule):
    """p(z) = Π_d StudentT(z_d; ν, 0, 1): heavy tails, fixed degrees of freedom ν.

    Args:
        latent_dim: d.
        df: ν > 0; smaller is heavier-tailed (ν = 1 is Cauchy).
    """

    def __init__(self, latent_dim: int, df: float = 3.0) -> None:
        super().__init__()
        _check_dim(latent_dim)
        if not df > 0:
            raise ValueError(f"--df must be positive, got {df}")
        self.register_buffer("df", torch.full((latent_dim,), float(df)))
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.StudentT(self.df, self.loc, self.scale).to_event(1)


def _check_dim(latent_dim: int) -> None:
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")


#: the keywords the builder offers every prior factory (see :mod:`pyro_vae.cli.parts`):
#: ``posterior`` is the guide's x -> q(z|x), for the VampPrior
PRIOR_KEYWORDS = (
    "latent_dim",
    "data_dim",
    "posterior",
    "components",
    "pseudo_inputs",
    "df",
)


def _normal_prior(latent_dim: int) -> nn.Module:
    return StandardNormalPrior(latent_dim)


def _learned_normal_prior(latent_dim: int) -> nn.Module:
    return LearnedNormalPrior(latent_dim)


def _mog_prior(latent_dim: int, components: int = 10) -> nn.Module:
    return MixtureOfGaussiansPrior(latent_dim, components)


def _vamp_prior(
    posterior: Callable[[torch.Tensor], dist.Distribution],
    data_dim: int,
    pseudo_inputs: int = 500,
) -> nn.Module:
    return VampPrior(posterior, pseudo_inputs, data_dim)


def _student_t_prior(latent_dim: int, df: float = 3.0) -> nn.Module:
    return StudentTPrior(latent_dim, df)


#: name -> factory returning a prior module. Each factory names the options it takes
#: (``components`` for mog, ``pseudo_inputs`` for vamp, ``df`` for student-t); the
#: builder passes it those, of :data:`PRIOR_KEYWORDS`.
PRIORS: dict[str, Callable[..., nn.Module]] = {
    name: registry_entry("prior", name, factory, PRIOR_KEYWORDS)
    for name, factory in [
        ("normal", _normal_prior),
        ("learned-normal", _learned_normal_prior),
        ("mog", _mog_prior),
        ("vamp", _vamp_prior),
        ("student-t", _student_t_prior),
    ]
}
