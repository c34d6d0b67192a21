"""The guide contract in code: :class:`AmortizedGuide`.

Every guide in :mod:`pyro_vae.guides` derives from it. A subclass says only what
q(z|x) is, in :meth:`AmortizedGuide.posterior`; the Pyro program, ``forward``, is
shared, so every guide samples the same site in the same plate.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

__all__ = ["AmortizedGuide"]


class AmortizedGuide(PyroModule):
    r"""An amortized guide q_phi(z | x), defined by its :meth:`posterior`.

    The contract (see :mod:`pyro_vae.models.vae` for the model's side):

    * ``posterior(x)`` takes a batch ``(N, D)`` and returns q(z|x) as a distribution
      with batch shape ``(N,)`` and event shape ``(d,)``; the VampPrior calls it on
      its pseudo-inputs (it takes any :class:`pyro_vae.nn.PosteriorFn`);
    * ``guide(x)`` opens ``pyro.plate("data", N)`` and samples the site ``"z"`` from
      ``posterior(x)`` inside it, and returns the draw ``(N, d)`` (``(P, N, d)``
      inside a particle plate).

    A subclass implements :meth:`posterior` (the base class cannot: PyroModule's
    metaclass does not mix with :class:`abc.ABCMeta`, so calling it here raises
    ``NotImplementedError``). Its networks are submodules.
    """

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z|x): batch shape ``(N,)``, event shape ``(d,)``."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement posterior(x) -> q(z|x), a "
            "distribution with batch shape (N,) and event shape (d,)"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.posterior(x))
