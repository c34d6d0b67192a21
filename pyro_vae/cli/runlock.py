"""One directory, one writer: an OS file lock on a run directory while it is written.

A process that writes a run directory (``fit``, ``fit --resume``, ``evaluate``) first
takes an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock`` and writes its PID there. The
OS releases the lock when the process ends, however it ends (SIGKILL included), so a
stale ``.lock`` file never blocks anyone: only a live holder does. A second writer is
refused with a message naming the holder's PID. The directory itself is locked too
(best effort), so that deleting ``.lock`` under a running process does not let a second
writer in.

Locks belong to a :func:`scope`: leaving it (return or exception) releases every lock
taken inside, so one Python process may train and then resume runs one after the
other. Inside a scope, an ``OSError`` writing into a locked directory (read-only,
disk full) becomes a one-line :class:`RunDirError` naming the directory.
"""

from __future__ import annotations

import errno
import os
import shlex
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import TypeVar

from pyro_vae.errors import PyroVAEError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_NAME",
    "RunDirError",
    "acquire",
    "release_all",
    "scope",
    "scoped",
    "unwritable",
]

LOCK_NAME = ".lock"
#: errors of a write that a user fixes outside the program (permissions, space)
WRITE_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
}

F = TypeVar("F", bound=Callable)


class RunDirError(PyroVAEError):
    """A run directory that cannot be written: in use, read-only, full, not a run."""


class _Held:
    """A lock this process holds: ``path`` resolved, ``given`` as the user wrote it;
    ``fds``: the lock file's descriptor, then the directory's (if locked)."""

    def __init__(self, given: Path, fds: list[int]) -> None:
        self.given, self.path, self.fds = given, _key(given), fds

    def release(self) -> None:
        """Unlock, and remove the lock file (only while it is still ours)."""
        if not self.fds:
            return
        file_fd, others = self.fds[0], self.fds[1:]
        for fd in others:  # the directory first: the file keeps others out meanwhile
            _close(fd)
        try:
            if _same_file(file_fd, self.given / LOCK_NAME):
                os.unlink(self.given / LOCK_NAME)
        except OSError:
            pass  # read-only now, or gone: the next writer takes it over
        _close(file_fd)  # closing the descriptor releases its flock
        self.fds = []


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        there, mine = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)


_local = threading.local()  # each thread its own scopes: one list of locks per scope
_unscoped: list[_Held] = []  # taken outside any scope: held until the process ends


def _scopes() -> list[list[_Held]]:
    if not hasattr(_local, "scopes"):
        _local.scopes = []
    return _local.scopes


def _key(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _held(path: Path) -> _Held | None:
    key = _key(path)
    for frame in _scopes():
        for held in frame:
            if held.path == key and held.fds:
                return held
    return None


def unwritable(
    run_dir: str | os.PathLike, err: OSError, what: str = "fit"
) -> RunDirError:
    """The one-line error for ``err``, a failed write into ``run_dir``."""
    run_dir = Path(run_dir)
    where = err.filename if err.filename else run_dir
    reason = err.strerror or type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = f"free space on the disk of {run_dir}"
    elif (run_dir / "checkpoint.pt").is_file():
        fix = f"make {run_dir} writable (or copy the run to a directory you can write)"
    else:
        fix = f"make {run_dir} writable, or give an --out you can write"
    message = f"cannot write {where}: {reason}; {fix}"
    if what == "fit" and (run_dir / "checkpoint.pt").is_file():
        message += (
            ", then resume with: python -m pyro_vae.fit --resume "
            f"{shlex.quote(str(run_dir))}"
        )
    else:
        message += ", then try again"
    return RunDirError(message)


def acquire(run_dir: str | os.PathLike, what: str = "fit") -> None:
    """Lock ``run_dir`` for this process until the enclosing :func:`scope` ends.

    Raises:
        RunDirError: another live process holds the lock (its PID is named), or the
            directory cannot be written.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(
            f"{run_dir} is not a directory; give a run directory written by "
            "python -m pyro_vae.fit"
        )
    if fcntl is None or _held(run_dir) is not None:
        return
    path = run_dir / LOCK_NAME
    fd = _lock_file(run_dir, path, what)
    fds = [fd]
    try:
        try:  # the directory too: `rm .lock` must not let a second writer in
            dir_fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            dir_fd = None
        if dir_fd is not None:
            fds.append(dir_fd)
            try:
                fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _in_use(
                    run_dir, "another process (its .lock file was removed)"
                ) from None
            except OSError:
                pass  # best effort (NFS cannot lock a directory)
        try:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {what} {stamp}\n".encode(), 0)
        except OSError as err:
            raise unwritable(run_dir, err, what) from None
    except BaseException:
        _Held(run_dir, fds).release()
        raise
    (_scopes()[-1] if _scopes() else _unscoped).append(_Held(run_dir, fds))


def _lock_file(run_dir: Path, path: Path, what: str) -> int:
    """Open and flock ``path``; its descriptor. A holder that releases removes the
    file, so a lock won on a file no longer at ``path`` is tried again."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    for _ in range(50):
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as err:
            raise unwritable(run_dir, err, what) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            _close(fd)
            raise _in_use(run_dir, holder) from None
        except OSError as err:  # e.g. ENOLCK: a file system without locks
            warnings.warn(
                f"cannot lock {path} ({err.strerror}); nothing stops a second "
                "process from writing this run directory at the same time",
                stacklevel=3,
            )
            return fd
        if _same_file(fd, path):
            return fd
        _close(fd)
    raise RunDirError(f"cannot lock {path}: it keeps being replaced; try again")


def _holder(fd: int) -> str:
    """``PID N (what, since T)`` from the lock file, as far as it can be read."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        text = []
    if not text or not text[0].isdigit():
        return "another process"
    pid, rest = text[0], text[1:]
    what = f"pyro_vae.{rest[0]}" if rest else "pyro_vae"
    since = f", since {' '.join(rest[1:3])}" if len(rest) >= 3 else ""
    return f"process {pid} ({what}{since})"


def _in_use(run_dir: Path, holder: str) -> RunDirError:
    pid = holder.split()[1] if holder.startswith("process ") else None
    stop = f" (kill {pid})" if pid else ""
    return RunDirError(
        f"{run_dir} is in use by {holder}: one process writes a run directory at a "
        f"time; wait for it to finish or stop it{stop}, then try again"
    )


@contextmanager
def scope(what: str = "fit") -> Iterator[None]:
    """Release the locks taken inside on leaving; turn write errors into one line."""
    frame: list[_Held] = []
    _scopes().append(frame)
    try:
        yield
    except OSError as err:
        target = _target(err, frame)
        if target is None:
            raise
        raise unwritable(target, err, what) from None
    finally:
        _scopes().remove(frame)
        for held in frame:
            held.release()


def scoped(fn: F) -> F:
    """Decorator: run ``fn`` inside a :func:`scope`."""

    @wraps(fn)
    def wrapper(*args, **kwargs):  # noqa: ANN202 - same as fn's
        with scope():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _target(err: OSError, frame: list[_Held]) -> Path | None:
    """The locked directory ``err`` failed to write, if it is one of ``frame``'s."""
    if not frame:
        return None
    if err.filename:
        name = _key(Path(os.fsdecode(err.filename)))
        for held in frame:
            if name == held.path or held.path in name.parents:
                return held.given
        return None
    if err.errno in WRITE_ERRNOS:  # a write to an open file: no name to go by
        return frame[-1].given
    return None


def release_all() -> None:
    """Release locks taken outside any scope (tests, interactive sessions)."""
    for held in _unscoped:
        held.release()
    _unscoped.clear()
