"""Errors that carry a message for the user: what is wrong and how to fix it.

The CLI prints these without a traceback. Both subclass ``ValueError``, so code that
already catches ``ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "PyroVAEError"]


class PyroVAEError(ValueError):
    """Base class of every user-facing pyro_vae error."""


class ConfigError(PyroVAEError):
    """An impossible or unknown setting: a flag value, a name, a device."""


class DataError(PyroVAEError):
    """Data that cannot be used as given: bad shape, values, files or support."""
