"""Files written whole or not at all: the one atomic-write helper of pyro_vae.

A process stopped mid-write (Ctrl-C, SIGKILL, a full disk) must never leave a
half-written checkpoint, history, metrics file, report or figure. Every writer goes
through :func:`atomic_path`: the content goes to a temporary file beside the target
(``.NAME.RANDOM.tmp``, so a directory's strays are found by :data:`STRAY_GLOB`), is
flushed and fsynced, then renamed over the target with :func:`os.replace`, which is
atomic on POSIX. The file gets the permissions any new file would (``mkstemp``'s own
are 0600). On any failure the temporary file is removed and an :class:`OSError`
names the target, not the temporary file.

Imports nothing of pyro_vae.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["STRAY_GLOB", "atomic_open", "atomic_path", "atomic_write_text"]

#: what an atomic write killed before its rename leaves behind
STRAY_GLOB = ".*.tmp"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write to; on success it replaces ``path`` atomically.

    For writers that take a file name (``savefig``, ``to_netcdf``). The parent
    folder is created if needed.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
        )
        tmp = Path(name)
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may not have synced its data
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", **kwargs: object
) -> Iterator[IO]:
    """An open file (``"w"`` text or ``"wb"`` bytes) that replaces ``path`` when the
    block ends without an error; ``kwargs`` go to :func:`open` (``newline=""``)."""
    if mode not in ("w", "wb"):
        raise ValueError(
            f"atomic_open writes a new file: mode 'w' or 'wb', not {mode!r}"
        )
    if mode == "w":
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
