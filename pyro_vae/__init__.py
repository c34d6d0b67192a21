"""pyro_vae: variational autoencoders written the Pyro way.

The generative model p(z) p(x|z) lives in :mod:`pyro_vae.models`, the amortized guide
q(z|x) in :mod:`pyro_vae.guides`; :func:`pyro_vae.training.loop.train` fits any (model,
guide) pair by SVI, and ``python -m pyro_vae.fit`` assembles and trains one from the
command
line. Importing this package has no side effects.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(run_dir: str, device: str = "cpu"):  # noqa: ANN201 - TrainedVAE, lazily
    """Load a trained run: see :func:`pyro_vae.cli.loading.load`."""
    from pyro_vae.cli.loading import (
        load as _load,  # imported here: no import side effects
    )

    return _load(run_dir, device)
