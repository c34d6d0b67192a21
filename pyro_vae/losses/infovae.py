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

**A prior the objective cannot train.** At α = 1 there is no KL term, and the MMD
term sees p(z) only through its draws: a prior without ``rsample`` gets no gradient
at all, and a mixture's weights get none from a draw (the component choice is
discrete; see :class:`pyro_vae.models.priors.ReparameterizedMixture`). On its first
differentiable call at α = 1 with an MMD term, the loss checks which of the prior's
learnable tensors (the leaves of log p(z) at a detached z) get a nonzero gradient
from the objective, and warns once, by name, about those that do not: they would
silently stay at their initial values. (With α ≠ 1 the KL term's log p(z) reaches
them all; ``ae`` has no prior term by design.)

References:
    Zhao, Song & Ermon (2019), InfoVAE: Balancing Learning and Inference in
    Variational Autoencoders, AAAI, arXiv:1706.02262. Higgins et al. (2017),
    beta-VAE, ICLR. Gretton et al. (2012), A Kernel Two-Sample Test, JMLR 13.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from pyro.infer import Trace_ELBO
from pyro.infer.elbo import ELBOModule
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
        kl_warmup: weigh the KL term by a tensor ``kl_weight`` w in [0, 1] (1 at
            first) that a warm-up sets before each step, so the objective is
            -E log p(x|z) + w (1 - α) KL + (α + λ - 1) MMD² (Sønderby et al. 2016).
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
        kl_warmup: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        # A warm-up's KL weight w: the objective's KL term is weighed w (1 - α).
        # A tensor, lifted as a buffer of the loss module (__call__), so that a
        # traced step reads its value on every call (pyro_vae.training.trace_guard).
        self.kl_weight = torch.ones(()) if kl_warmup else None
        self.alpha, self.lam = float(alpha), float(lam)
        self.kernel = kernel or Kernel()
        self.unbiased, self.latent_site = unbiased, latent_site
        self.mmd_weight = self.alpha + self.lam - 1.0
        if abs(self.mmd_weight) < 1e-9:  # lam typed as 1 - alpha, up to rounding
            self.mmd_weight = 0.0
        # The once-per-instance check for prior tensors the objective cannot reach
        # (module docstring); _parts holds (model, guide) during a call, for names.
        self._prior_check_pending = True
        self._parts: tuple[object, object] | None = None
        if self.mmd_weight < 0:
            warnings.warn(
                f"InfoVAE with alpha + lam - 1 = {self.mmd_weight:g} < 0 puts a "
                "negative weight on MMD(q(z), p(z)): it rewards a mismatch between the "
                "aggregate posterior and the prior. Use lam >= 1 - alpha.",
                stacklevel=2,
            )

    @property
    def is_elbo(self) -> bool:
        """True at (α, λ) = (0, 1) without warm-up: ``Trace_ELBO`` exactly."""
        return self.alpha == 0.0 and self.mmd_weight == 0.0 and self.kl_weight is None

    def __call__(self, model: Callable, guide: Callable) -> torch.nn.Module:
        """The loss as a module of (model, guide), holding the KL weight as a buffer."""
        if self.kl_weight is None:
            return super().__call__(model, guide)
        module = _WeightedModule(model, guide, self)
        like = next(module.parameters(), self.kl_weight)
        self.kl_weight = self.kl_weight.to(like.device, like.dtype)
        module.register_buffer("kl_weight", self.kl_weight, persistent=False)
        return module

    def loss(
        self, model: Callable, guide: Callable, *args: object, **kwargs: object
    ) -> float:
        """The objective's value (a float), like ``Trace_ELBO.loss``."""
        if self.is_elbo:
            return super().loss(model, guide, *args, **kwargs)
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: object, **kwargs: object
    ) -> torch.Tensor:
        """The surrogate loss, like ``Trace_ELBO.differentiable_loss``."""
        with self._naming(model, guide):
            return super().differentiable_loss(model, guide, *args, **kwargs)

    def loss_and_grads(
        self, model: Callable, guide: Callable, *args: object, **kwargs: object
    ) -> float:
        """The loss, with gradients accumulated, like ``Trace_ELBO.loss_and_grads``."""
        with self._naming(model, guide):
            return super().loss_and_grads(model, guide, *args, **kwargs)

    @contextmanager
    def _naming(self, model: Callable, guide: Callable) -> Iterator[None]:
        """Hold (model, guide) during a call, to name the prior tensors checked."""
        if not self._prior_check_pending:
            yield
            return
        self._parts = (model, guide)
        try:
            yield
        finally:
            self._parts = None

    def _differentiable_loss_particle(self, model_trace, guide_trace):  # noqa: ANN001
        loss, surrogate = super()._differentiable_loss_particle(
            model_trace, guide_trace
        )
        if self.kl_weight is not None:
            # -ELBO + c (log p(z) - log q(z|x)) with c = 1 - w (1 - α):
            # -E log p(x|z) + w (1 - α) KL estimate
            log_ratio = self._log_prior_ratio(model_trace, guide_trace)
            c = 1.0 - self.kl_weight * (1.0 - self.alpha)
            loss = loss + c * torch_item(log_ratio)
            surrogate = surrogate + c * log_ratio
        elif self.alpha:
            # -ELBO + α (log p(z) - log q(z|x)) = -E log p(x|z) + (1-α) KL estimate
            log_ratio = self._log_prior_ratio(model_trace, guide_trace)
            loss = loss + self.alpha * torch_item(log_ratio)
            surrogate = surrogate + self.alpha * log_ratio
        if self.mmd_weight:
            penalty = self.mmd_weight * self._scaled_mmd(model_trace, guide_trace)
            loss = loss + torch_item(penalty)
            surrogate = surrogate + penalty
        if self._prior_check_pending and self._can_check(guide_trace):
            self._prior_check_pending = False
            self._warn_about_untrained_prior(model_trace, guide_trace, surrogate)
        return loss, surrogate

    def _can_check(self, guide_trace) -> bool:  # noqa: ANN001
        """Whether this call can show which prior tensors the objective cannot train.

        Only α = 1 with an MMD term needs the check. With α ≠ 1 the KL term holds
        log p(z), whose leaves the checked tensors are by definition, so each gets a
        gradient (a KL warm-up's weight of 0 at the first step does not change
        that); ``ae`` (α = 1, no MMD) has no prior term by design. Not without a
        graph (``loss``, ``torch.no_grad``), not while ``torch.jit.trace`` records
        the loss (the eager first call has checked), and not on a batch of one
        datum (no MMD estimate, so no MMD gradient to see).
        """
        if self.alpha != 1.0 or not self.mmd_weight:
            return False
        if not torch.is_grad_enabled() or torch.jit.is_tracing():
            return False
        site = guide_trace.nodes.get(self.latent_site)
        return not (site and site["value"].shape[-2] < 2)

    def _warn_about_untrained_prior(
        self,
        model_trace,  # noqa: ANN001
        guide_trace,  # noqa: ANN001
        surrogate: torch.Tensor,
    ) -> None:
        """Warn, naming them, about prior tensors the surrogate gives no gradient.

        The prior's learnable tensors are the leaves that require grad of
        log p(z) at each latent site, evaluated at the detached z (so the guide's
        own parameters are not among them, unless the prior shares them, as the
        VampPrior shares the encoder). Those whose gradient from this particle's
        surrogate is missing or exactly zero are named.
        """
        leaves: dict[int, torch.Tensor] = {}
        priors: dict[str, object] = {}
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            model_site = model_trace.nodes.get(name)
            if model_site is None or model_site["is_observed"]:
                continue
            priors[name] = model_site["fn"]
            log_p = model_site["fn"].log_prob(model_site["value"].detach())
            leaves.update(_grad_leaves(log_p))
        if not leaves:
            return
        tensors = list(leaves.values())
        if surrogate.requires_grad:
            grads = torch.autograd.grad(
                surrogate, tensors, retain_graph=True, allow_unused=True
            )
        else:
            grads = (None,) * len(tensors)
        idle = [
            t for t, g in zip(tensors, grads, strict=True) if g is None or not g.any()
        ]
        if not idle:
            return
        names = _tensor_names(idle, self._parts or ())
        warnings.warn(
            f"Trace_InfoVAE(alpha={self.alpha:g}, lam={self.lam:g}): the learnable "
            f"prior parameter(s) {', '.join(names)} get no gradient from any term of "
            f"the objective, so they stay at their initial values. "
            f"{self._why_untrained(priors)}",
            UserWarning,
            stacklevel=2,
        )

    def _why_untrained(self, priors: dict[str, object]) -> str:
        """Why a prior's tensors get no gradient at α = 1, for the warning."""
        reasons = [
            "With alpha = 1 there is no KL term, and MMD sees p(z) only through its "
            "draws."
        ]
        for name, fn in priors.items():
            base = type(fn).__name__
            if not fn.has_rsample:
                reasons.append(
                    f"The prior at site {name!r} ({base}) has no rsample, so its "
                    "draws carry no gradient at all."
                )
            elif isinstance(fn, torch.distributions.MixtureSameFamily):
                reasons.append(
                    f"The prior at site {name!r} is a mixture: its component choice "
                    "is discrete, so a draw carries no gradient to the mixture "
                    "weights (pyro_vae.models.priors.ReparameterizedMixture)."
                )
        reasons.append(
            "Use alpha < 1, so that a KL term trains them, or make them fixed."
        )
        return " ".join(reasons)

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


class _WeightedModule(ELBOModule):
    """Pyro's ELBO module, keeping the loss's ``kl_weight`` on its buffer when the
    module is moved (``.to``, ``.double()``), so the trace keeps reading the tensor
    the warm-up fills."""

    def _apply(self, fn: Callable, *args: object, **kwargs: object) -> torch.nn.Module:
        module = super()._apply(fn, *args, **kwargs)
        self.elbo.kl_weight = self.kl_weight
        return module


def _grad_leaves(tensor: torch.Tensor) -> dict[int, torch.Tensor]:
    """The leaf tensors requiring grad that ``tensor`` was computed from, by id."""
    leaves: dict[int, torch.Tensor] = {}
    stack, seen = [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node's leaf
        if variable is not None:
            leaves[id(variable)] = variable
        stack.extend(child for child, _ in node.next_functions)
    return leaves


def _tensor_names(tensors: list[torch.Tensor], parts: tuple) -> list[str]:
    """Names of ``tensors`` as parameters of the model (then the guide), else shapes.

    The guide's names get a ``guide.`` prefix; a tensor neither module owns is
    described by its shape.
    """
    names: dict[int, str] = {}
    for prefix, part in zip(("", "guide."), parts, strict=False):
        if isinstance(part, torch.nn.Module):
            for name, p in part.named_parameters():
                names.setdefault(id(p), prefix + name)
    return [names.get(id(t), f"a tensor of shape {tuple(t.shape)}") for t in tensors]


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
