"""A prior given as a distribution, kept as a module so that it follows the model.

``VAE(prior=dist.Normal(torch.zeros(d), 1.0).to_event(1), ...)`` is the shortest way
to write a prior. A bare distribution's tensors are not the model's: they would stay
out of ``state_dict`` and would not move with ``.to(device)`` or ``.to(dtype)``.
:class:`DistributionPrior` holds them as buffers and rebuilds the distribution on
each call.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import Distribution, Independent, MixtureSameFamily
from torch.distributions.utils import lazy_property

__all__ = ["DistributionPrior"]

PASS_A_MODULE = (
    "pass a module whose forward() returns the distribution instead (its tensors "
    "then buffers or parameters, as in pyro_vae.models.priors)"
)


class DistributionPrior(nn.Module):
    """A fixed distribution held as a module: ``forward()`` rebuilds it from buffers.

    A ``pyro.distributions`` object is not a module: its tensors are outside
    ``state_dict`` and stay where they were made when the model is moved with
    ``.to(device)`` or ``.to(dtype)``. This module takes the distribution apart when
    it is built and keeps its parameter tensors as buffers (contiguous copies), and
    every call builds the same distribution again, of the same class, from the
    buffers as they now are (moved, cast, or loaded from a checkpoint).

    What it can take apart:

    * a leaf distribution (``Normal``, ``StudentT``, ``Laplace``, ``Bernoulli``,
      ``MultivariateNormal``, ...): its constructor's arguments are read back from
      the instance by name (torch stores them under their own names; of a family of
      alternative parameterizations such as ``probs``/``logits`` or
      ``scale_tril``/``covariance_matrix``, the one the distribution holds is used);
      tensors become buffers, numbers and shapes plain attributes;
    * ``Independent`` (``.to_event(k)``), Pyro's ``ExpandedDistribution``
      (``.expand(shape)``) and ``MixtureSameFamily``, around any of these, nested.

    After rebuilding once it checks the copy against the original: same class,
    shapes and ``log_prob`` at a draw (taken on a forked RNG). Anything else, or a
    distribution holding tensors that require grad (a learnable prior must be a
    module, or its parameters would not be trained), is refused with a
    ``TypeError``/``ValueError`` saying to pass a module.

    Args:
        distribution: the distribution over z, event_dim 1 for a VAE prior.
    """

    def __init__(self, distribution: Distribution) -> None:
        super().__init__()
        if not isinstance(distribution, Distribution):
            raise TypeError(
                f"DistributionPrior takes a torch/pyro distribution, got "
                f"{type(distribution).__name__}"
            )
        self.cls = type(distribution)
        self._validate = vars(distribution).get("_validate_args")  # None: default
        self._args: dict[str, str] = {}  # constructor argument -> buffer name
        self._static: dict[str, Any] = {}  # constructor argument -> plain value
        if isinstance(distribution, Independent):
            self.kind = "independent"
            self.base = DistributionPrior(distribution.base_dist)
            self._static["reinterpreted_batch_ndims"] = (
                distribution.reinterpreted_batch_ndims
            )
        elif isinstance(distribution, dist.ExpandedDistribution):
            self.kind = "expanded"
            self.base = DistributionPrior(distribution.base_dist)
            self._static["batch_shape"] = torch.Size(distribution.batch_shape)
        elif isinstance(distribution, MixtureSameFamily):
            self.kind = "mixture"
            self.mixture = DistributionPrior(distribution.mixture_distribution)
            self.component = DistributionPrior(distribution.component_distribution)
        else:
            self.kind = "leaf"
            self._take_apart(distribution)
        self._check(distribution)

    def forward(self) -> Distribution:
        if self.kind == "independent":
            args = {"base_distribution": self.base(), **self._static}
        elif self.kind == "expanded":
            return self.cls(self.base(), **self._static)
        elif self.kind == "mixture":
            args = {
                "mixture_distribution": self.mixture(),
                "component_distribution": self.component(),
            }
        else:
            args = {name: getattr(self, buf) for name, buf in self._args.items()}
            args.update(self._static)
        if self._validate is not None:
            args["validate_args"] = self._validate
        return self.cls(**args)

    def extra_repr(self) -> str:
        return f"{self.cls.__name__}"

    # -- taking a leaf distribution apart ------------------------------------------

    def _take_apart(self, d: Distribution) -> None:
        """Find the constructor arguments on ``d`` and store them."""
        cls = type(d)
        try:
            signature = inspect.signature(cls.__init__)
        except (TypeError, ValueError):  # pragma: no cover - builtin constructors
            why = "its constructor cannot be read"
            raise TypeError(self._refusal(d, why)) from None
        found: dict[str, Any] = {}
        derivable: list[str] = []  # lazily computed alternatives, maybe not given
        for name, param in list(signature.parameters.items())[1:]:
            if name == "validate_args" or param.kind in (
                param.VAR_POSITIONAL,
                param.VAR_KEYWORD,
            ):
                continue
            attr = inspect.getattr_static(cls, name, None)
            if name in vars(d):
                found[name] = vars(d)[name]
                if isinstance(attr, lazy_property):
                    derivable.append(name)
            elif attr is not None and not isinstance(attr, lazy_property):
                try:
                    found[name] = getattr(d, name)  # a property, e.g. Beta's
                except (AttributeError, NotImplementedError):
                    pass
            if name not in found and param.default is inspect.Parameter.empty:
                raise TypeError(
                    self._refusal(d, f"its argument {name!r} cannot be read back")
                )
        for value in found.values():
            self._check_value(d, value)
        args = self._first_that_builds(d, found, derivable)
        for name, value in args.items():
            if isinstance(value, torch.Tensor):
                buf = name if not hasattr(self, name) else f"param_{name}"
                self.register_buffer(buf, value.detach().clone().contiguous())
                self._args[name] = buf
            else:
                self._static[name] = value

    def _first_that_builds(
        self, d: Distribution, found: dict[str, Any], derivable: list[str]
    ) -> dict[str, Any]:
        """``found`` less the fewest derived alternatives, so that the class builds.

        E.g. a ``Bernoulli(probs=p)`` whose ``logits`` were looked at holds both, and
        its constructor takes only one of them.
        """
        for drop in range(len(derivable) + 1):
            for names in itertools.combinations(derivable, drop):
                args = {k: v for k, v in found.items() if k not in names}
                try:
                    type(d)(**args)
                except (TypeError, ValueError):
                    continue
                return args
        raise TypeError(self._refusal(d, "it cannot be rebuilt from its attributes"))

    def _check_value(self, d: Distribution, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                raise ValueError(
                    f"the prior {type(d).__name__} holds tensors that require grad; "
                    "as a distribution object they would never be trained. For a "
                    "learnable prior, " + PASS_A_MODULE
                )
        elif isinstance(value, Distribution):
            raise TypeError(self._refusal(d, "it holds another distribution"))
        elif not isinstance(value, (int, float, bool, str, tuple, type(None))):
            raise TypeError(
                self._refusal(d, f"it holds a {type(value).__name__} (not a tensor)")
            )

    @staticmethod
    def _refusal(d: Distribution, why: str) -> str:
        return (
            f"cannot keep the prior {type(d).__name__} as a module ({why}), so it "
            f"would not follow the model to another device or dtype; {PASS_A_MODULE}"
        )

    def _check(self, d: Distribution) -> None:
        """The rebuilt distribution must be the original one."""
        rebuilt = self()
        same = (
            type(rebuilt) is type(d)
            and rebuilt.batch_shape == d.batch_shape
            and rebuilt.event_shape == d.event_shape
        )
        if same:
            tensors = [b for b in self.buffers() if b.is_cuda]
            devices = sorted({b.device.index or 0 for b in tensors})
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                try:
                    value = d.sample()
                except NotImplementedError:
                    value = None
                if value is not None:
                    want, got = d.log_prob(value), rebuilt.log_prob(value)
                    same = torch.allclose(got, want, rtol=1e-6, atol=0, equal_nan=True)
        if not same:
            raise ValueError(
                self._refusal(d, "rebuilt from its attributes it is not the same")
            )
