"""Errors that carry a message for the user: what is wrong and how to fix it.

The CLI prints these without a traceback. Both subclass ``ValueError``, so code that
already catches ``ValueError`` keeps working. :class:`CommandParser` is the
command lines' argparse: a bad value gets one line, a malformed command its usage.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, NoReturn

__all__ = ["CommandParser", "ConfigError", "DataError", "PyroVAEError"]


class PyroVAEError(ValueError):
    """Base class of every user-facing pyro_vae error."""


class ConfigError(PyroVAEError):
    """An impossible or unknown setting: a flag value, a name, a device."""


class DataError(PyroVAEError):
    """Data that cannot be used as given: bad shape, values, files or support."""


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage block is kept for malformed commands.

    An unknown flag, a flag without its value or a missing argument print the usage
    and the error, as argparse does; a value that does not convert or is not one of
    the choices (and :meth:`fail`, for checks made after parsing) print one line,
    ``PROG: error: MESSAGE``. Both exit with status 2. Negative numbers in any
    notation (``-1e9``, ``-.5``, ``-inf``) are values, not flags, so ``--lam -1e9``
    works as ``--lam=-1e9`` does.
    """

    _NEGATIVE_NUMBER = re.compile(
        r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse's own pattern (-1, -0.5) misses exponents and infinities
        self._negative_number_matcher = self._NEGATIVE_NUMBER
        self._bad_value = False

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        try:
            return super()._get_values(action, arg_strings)
        except argparse.ArgumentError:  # a type conversion or a choice failed
            self._bad_value = True
            raise

    def error(self, message: str) -> NoReturn:
        if self._bad_value:
            self.fail(message)
        super().error(message)

    def fail(self, message: str) -> NoReturn:
        """Exit with status 2 after one line, ``PROG: error: MESSAGE``, no usage."""
        self.exit(2, f"{self.prog}: error: {message}\n")
