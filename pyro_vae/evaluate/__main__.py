"""``python -m pyro_vae.evaluate RUN_DIR``: the command lives in
:mod:`pyro_vae.cli.evaluate`.
"""

from __future__ import annotations

import sys

from pyro_vae.cli.evaluate import main

sys.exit(main())
