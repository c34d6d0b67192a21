"""``python -m pyro_vae`` is ``python -m pyro_vae.fit``."""

from pyro_vae.cli.fit import cli

cli()
