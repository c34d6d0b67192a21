"""Test harness: float64, module-local parameters, validation on, a fixed seed."""

from __future__ import annotations

import os

import pyro
import pytest
import torch

# Ask for the non-interactive backend before anything imports pyplot.
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _harness():
    """Every test starts from seed 0 in float64 with Pyro validation on."""
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.settings.set(module_local_params=True)
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    torch.set_default_dtype(old_dtype)
