"""``python -m pyro_vae.fit``: the command lives in :mod:`pyro_vae.cli.fit`."""

# ruff: noqa: E402 - the signal handlers come before torch's imports (below)
from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while torch imports: one line, not a traceback
    from pyro_vae.cli import signals as _signals

    _signals.install("while starting (importing torch)")

from pyro_vae.cli.fit import cli, main, parse_args, parse_command

__all__ = ["cli", "main", "parse_args", "parse_command"]

if __name__ == "__main__":
    cli()
