r"""InfoVAE as a Pyro loss: ``Trace_InfoVAE``, usable wherever ``Trace_ELBO`` is.

The InfoVAE family (Zhao, Song & Ermon, 2019, eq. 6) minimizes, per datum,

.. math::
    -E_{q(z|x)} \log p(x \mid z)
    + (1 - \alpha)\, \mathrm{KL}(q(z \mid x) \,\|\, p(z))
    + (\alpha + \lambda - 1)\, D(q(z) \,\|\, p(z)),

where q(z) = E_{p_D(x)} q(z|x) is the aggregate posterior and D is MMD² (the paper's
MMD-VAE choice). Named points (see :data:`PRESETS`):

====================  ==============  =========================================
preset                (alpha, lambda)  objective
====================  ==============  =========================================
``elbo``              (0, 1)          the ELBO; equals ``Trace_ELBO`` exactly
``beta-vae``          (1-β, β)        -E log p(x|z) + β KL  (Higgins et al., 2017)
``mmd-vae``           (1, λ)          -E log p(x|z) + λ MMD²; λ = 1000 for MNIST
``ae``                (1, 0)          -E log p(x|z) alone: no KL, no MMD
``infovae``           (α, λ)          the general point
====================  ==============  =========================================

**Scale conventions.** Pyro's loss is a sum over the data in the plate, each term in
nats. The KL term is per datum, like the reconstruction term. MMD² compares two
distributions, so it enters the per-datum objective once; summed over a batch of B
data that stand for N (the data plate's ``scale`` is N/B under subsampling, else 1),
the loss adds N·(α+λ-1)·MMD², so ``loss / N`` is the per-datum objective above. MMD²
is estimated between the batch's B codes z ~ q(z|x) (one per datum and particle: the
minibatch's aggregate posterior) and B draws from the model's own prior at the same
site, taken with ``rsample`` when the prior allows it, so learnable priors get
gradients. It is dimensionless (kernel values are in [0, 1] per scale). With P
vectorized particles, MMD² is estimated per particle and averaged, like the ELBO.

References:
    Zhao, Song & Ermon (2019), InfoVAE: Balancing Learning and Inference in
    Variational Autoencoders, AAAI, arXiv:1706.02262. Higgins et al. (2017),
    beta-VAE, ICLR. Gretton et al. (2012), A Kernel Two-Sample Test, JMLR 13.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from pyro.infer import Trace_ELBO
from pyro.infer.util import torch_item
from pyro.poutine.util import site_is_subsample

from pyro_vae.losses.kernels import Kernel
from pyro_vae.losses.mmd import mmd2

__all__ = ["PRESETS", "Trace_InfoVAE", "infovae_preset"]


class Trace_InfoVAE(Trace_ELBO):  # noqa: N801 - Pyro's naming of losses
    """InfoVAE objective (module docstring) as a :class:`pyro.infer.Trace_ELBO`.

    Args:
        alpha: α; 1 - α weighs KL(q(z|x) || p(z)).
        lam: λ; α + λ - 1 weighs MMD²(q(z), p(z)). A negative weight rewards a
            mismatch with the prior and warns.
        kernel: the MMD kernel and bandwidth rule.
        unbiased: U-statistic (default) or V-statistic MMD².
        latent_site: the latent sample site shared by model and guide.
        **kwargs: passed to :class:`~pyro.infer.Trace_ELBO` (``num_particles``, ...).
    """

    def __init__(
        self,
        alpha: float = 0.0,
        lam: float = 1.0,
        kernel: Kernel | None = None,
        *,
        unbiased: bool = True,
        latent_site: str = "z",
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self.alpha, self.lam = float(alpha), float(lam)
        self.kernel = kernel or Kernel()
        self.unbiased, self.latent_site = unbiased, latent_site
        self.mmd_weight = self.alpha + self.lam - 1.0
        if abs(self.mmd_weight) < 1e-9:  # lam typed as 1 - alpha, up to rounding
            self.mmd_weight = 0.0
        if self.mmd_weight < 0:
            warnings.warn(
                f"InfoVAE with alpha + lam - 1 = {self.mmd_weight:g} < 0 puts a "
                "negative weight on MMD(q(z), p(z)): it rewards a mismatch between the "
                "aggregate posterior and the prior. Use lam >= 1 - alpha.",
                stacklevel=2,
            )

    @property
    def is_elbo(self) -> bool:
        """True at (α, λ) = (0, 1), where this is ``Trace_ELBO`` exactly."""
        return self.alpha == 0.0 and self.mmd_weight == 0.0

    def loss(
        self, model: Callable, guide: Callable, *args: object, **kwargs: object
    ) -> float:
        """The objective's value (a float), like ``Trace_ELBO.loss``."""
        if self.is_elbo:
            return super().loss(model, guide, *args, **kwargs)
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def _differentiable_loss_particle(self, model_trace, guide_trace):  # noqa: ANN001
        loss, surrogate = super()._differentiable_loss_particle(
            model_trace, guide_trace
        )
        if self.alpha:
            # -ELBO + α (log p(z) - log q(z|x)) = -E log p(x|z) + (1-α) KL estimate
            log_ratio = self._log_prior_ratio(model_trace, guide_trace)
            loss = loss + self.alpha * torch_item(log_ratio)
            surrogate = surrogate + self.alpha * log_ratio
        if self.mmd_weight:
            penalty = self.mmd_weight * self._scaled_mmd(model_trace, guide_trace)
            loss = loss + torch_item(penalty)
            surrogate = surrogate + penalty
        return loss, surrogate

    def _log_prior_ratio(self, model_trace, guide_trace) -> torch.Tensor:  # noqa: ANN001
        """Σ over latent sites of log p(z) - log q(z|x) (reparameterized sites only)."""
        total = 0.0
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if not site["fn"].has_rsample:
                raise NotImplementedError(
                    f"Trace_InfoVAE with alpha != 0 needs reparameterized guide sites; "
                    f"{name!r} is not"
                )
            total = (
                total + model_trace.nodes[name]["log_prob_sum"] - site["log_prob_sum"]
            )
        return total

    def _scaled_mmd(self, model_trace, guide_trace) -> torch.Tensor:  # noqa: ANN001
        """N · MMD²(codes of the batch, as many prior draws), summed over particles."""
        site = guide_trace.nodes[self.latent_site]
        z_q = site["value"]
        if z_q.shape[-2] < 2:  # a last batch of one datum: no unbiased MMD estimate
            return z_q.new_zeros(())
        prior = model_trace.nodes[self.latent_site]["fn"]
        z_p = prior.rsample() if prior.has_rsample else prior.sample()
        n_represented = z_q.shape[-2] * site["scale"]
        return n_represented * mmd2(z_q, z_p, self.kernel, unbiased=self.unbiased).sum()


#: name -> (alpha, lam) as functions of the CLI's (alpha, lam, beta)
PRESETS: dict[str, Callable[[float, float, float], tuple[float, float]]] = {
    "elbo": lambda alpha, lam, beta: (0.0, 1.0),
    "beta-vae": lambda alpha, lam, beta: (1.0 - beta, beta),
    "mmd-vae": lambda alpha, lam, beta: (1.0, lam),
    "ae": lambda alpha, lam, beta: (1.0, 0.0),
    "infovae": lambda alpha, lam, beta: (alpha, lam),
}


def infovae_preset(
    name: str,
    *,
    alpha: float = 0.0,
    lam: float = 1000.0,
    beta: float = 1.0,
    kernel: Kernel | None = None,
    **kwargs: object,
) -> Trace_InfoVAE:
    """The named point of :data:`PRESETS` as a :class:`Trace_InfoVAE`.

    ``alpha`` and ``lam`` matter for ``infovae``; ``lam`` alone for ``mmd-vae``
    (default 1000, the paper's MNIST setting); ``beta`` for ``beta-vae``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(PRESETS)}")
    a, lam_ = PRESETS[name](alpha, lam, beta)
    return Trace_InfoVAE(a, lam_, kernel, **kwargs)
