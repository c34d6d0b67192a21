"""``python -m pyro_vae.report RUN_DIR``: the command lives in
:mod:`pyro_vae.cli.report`.
"""

from __future__ import annotations

import sys

from pyro_vae.cli.report import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
