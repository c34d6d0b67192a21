"""Signals outside training: one line and an exit status, never a traceback.

Training handles SIGINT (Ctrl-C) and SIGTERM itself (:mod:`pyro_vae.cli.run`): it
stops after the current step and writes a checkpoint. Everywhere else that ``fit``
spends time (Python importing torch, loading the data, building the networks, and
the end of the run: final ELBOs, evaluation, figures, report) :func:`handled` turns
the first signal into :class:`Stopped`, which the CLI reports in one line that names
the signal and what the process was doing, with the resume command where the run
has a checkpoint; the exit status is 128 + the signal's number (130, 143). While
torch imports, before :func:`handled`, the line is printed and the process exits at
once: nothing is written yet. A second signal while the first one unwinds is
ignored, so a double Ctrl-C still ends in one line. A signal that was ignored when
the process started (``nohup``, a background job) stays ignored.

Two stops would otherwise be lost. Some C code clears the exception a handler
raises (see :func:`_raise_again_if_swallowed`): the stop is raised again at the
next :func:`phase` and delivered again every half second until reported. And a
signal that reaches training's handler after training's last check (while the last
checkpoint is written) is found in the wakeup pipe by :func:`stop_if_pending`.

:func:`phase` names what the process is doing, for that line. With the environment
variable ``PYRO_VAE_PHASE_LOG=FILE`` each phase's name is also appended to FILE as
it starts: the tests use it to send a signal at a chosen moment.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "EXIT_STATUS",
    "PHASE_LOG",
    "Stopped",
    "describe",
    "handled",
    "ignore",
    "install",
    "mark_reported",
    "phase",
    "report",
    "stop_if_pending",
]

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
PHASE_LOG = "PYRO_VAE_PHASE_LOG"
REDELIVER_S = 0.5  # see _raise_again_if_swallowed


class Stopped(SystemExit):
    """A signal stopped the process outside training; ``code`` is 128 + signum.

    A ``SystemExit``, so that ``except Exception`` lets it pass, and so that a stop
    nobody catches (while torch imports) exits with that status, silently.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(EXIT_STATUS.get(signum, 128 + signum))
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class _State:
    """What the process is doing, where its run directory is, whether it stops."""

    def __init__(self) -> None:
        self.generation = 0  # one per handled() block: a watchdog serves only its own
        self.reset("while starting")

    def reset(self, what: str) -> None:
        self.phase, self.run_dir, self.stopping = what, None, False
        self.caught = False  # whether a caller reports Stopped itself
        self.trained = False  # whether training is over (the end of the run)
        self.wakeup: tuple[int, int] | None = None  # see _open_wakeup
        self.reported = False  # the stop's line is printed: later signals are moot
        self.requested: int | None = None  # the signal of a stop raised, if any
        self.watchdog = False  # see _raise_again_if_swallowed


_state = _State()
_lock = threading.Lock()


def _handler(signum: int, frame: object) -> None:
    # a second signal while the first unwinds, or once it is reported: one line only
    if _state.stopping or _state.reported:
        return
    stop = Stopped(signum)
    if not _state.caught:  # nobody above to report it (torch is importing): go now
        if _state.requested is not None:  # a stop raised before; its caller is gone
            return
        _state.reported = True
        print(f"interrupted: {describe(stop)}", file=sys.stderr)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(int(stop.code))  # nothing is written yet that needs closing
    _state.stopping, _state.requested = True, signum
    _raise_again_if_swallowed(signum)
    raise stop


def _raise_again_if_swallowed(signum: int) -> None:
    """Deliver ``signum`` again every second until the stop is reported.

    An exception raised in a signal handler surfaces in whatever Python code runs
    then, and some C code clears it: a Cython module's import-time registration
    with ``abc`` does (numpy imports ``numpy.random`` lazily at the start of a
    run). The process would then go on as if no signal had come. Delivered again,
    the signal finds other code, or training's own handler, which stops after the
    current step. Once the caller of :func:`handled` has gone, it stops.
    """
    if _state.watchdog:
        return
    _state.watchdog = True
    generation = _state.generation

    def watch() -> None:
        while True:
            time.sleep(REDELIVER_S)
            with _lock:  # handled() restores no handler meanwhile (see there)
                if (
                    _state.reported
                    or not _state.caught
                    or _state.generation != generation
                ):
                    return
                _state.stopping = False
                os.kill(os.getpid(), signum)  # a real signal: it wakes a sleep too
                if signal.getsignal(signum) is not _handler:
                    return  # training's handler has it now: it stops cleanly

    threading.Thread(target=watch, name="pyro_vae-stop", daemon=True).start()


def _raise_if_requested() -> None:
    """Raise the stop a signal asked for, if C code swallowed it (see above)."""
    if _state.requested is not None and _state.caught and not _state.reported:
        _state.stopping = True
        raise Stopped(_state.requested)


def report(stop: Stopped) -> int:
    """Print the one line of ``stop`` (:func:`describe`); its exit status."""
    mark_reported()
    print(f"interrupted: {describe(stop)}", file=sys.stderr)
    return int(stop.code)


def mark_reported() -> None:
    """The process is about to print why it stops: later signals change nothing."""
    _state.reported = True


def install(what: str = "while starting") -> None:
    """Handle SIGINT and SIGTERM from now on (``python -m pyro_vae.fit`` calls it
    before importing torch). Signals ignored at start stay ignored."""
    _state.reset(what)
    _log(what)
    try:
        for sig in EXIT_STATUS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, _handler)
    except ValueError:  # not the main thread: signals are not ours to handle
        pass


def ignore() -> None:
    """Ignore SIGINT and SIGTERM from now on: the CLI calls it once its exit status
    is decided, so a late signal (a second Ctrl-C while the interpreter shuts down)
    cannot turn that status into a death by signal."""
    try:
        for sig in EXIT_STATUS:
            signal.signal(sig, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


@contextmanager
def handled(run_dir: str | os.PathLike | None = None) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Stopped` for the caller to
    report with :func:`describe`; the previous handlers come back after it.

    ``run_dir``: the run a stop may be resumed from (``--resume``), until
    :func:`phase` names another.
    """
    _state.reset("while starting")
    _state.generation += 1
    _state.run_dir, _state.caught = run_dir, True
    previous = {}
    try:
        for sig in EXIT_STATUS:
            old = signal.getsignal(sig)
            if old is not signal.SIG_IGN:
                signal.signal(sig, _handler)
                previous[sig] = old
    except ValueError:  # not the main thread
        pass
    wakeup = _open_wakeup() if previous else None
    try:
        yield
    finally:
        with _lock:  # a signal the watchdog sends still finds _handler, which
            # ignores it now (signal.signal runs pending handlers before it swaps)
            _state.phase, _state.caught = "while exiting", False
            for sig, old in previous.items():
                signal.signal(sig, old)
        if wakeup is not None:
            _close_wakeup(wakeup)


def stop_if_pending() -> None:
    """Raise :class:`Stopped` for a signal that arrived while training held the
    signals but did not stop on it: during the last epoch's validation or checkpoint
    write, after the last step, training's handler records it and training ends
    normally. Called as training hands over to the end of the run."""
    _raise_if_requested()
    if _state.wakeup is None:
        return
    try:
        got = os.read(_state.wakeup[0], 4096)
    except (BlockingIOError, OSError):  # nothing arrived
        return
    for signum in got:
        if signum in EXIT_STATUS:
            _state.stopping = True
            raise Stopped(signum)


def _open_wakeup() -> tuple[int, int] | None:
    """A pipe the C-level handler writes each signal's number into, whichever
    Python handler runs (``signal.set_wakeup_fd``): it tells training's swallowed
    signals apart. Left alone when someone else (an event loop) holds it."""
    try:
        r, w = os.pipe()
    except OSError:
        return None
    try:
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError, AttributeError):  # not the main thread; Windows
        os.close(r), os.close(w)
        return None
    if old != -1:  # not ours to take
        signal.set_wakeup_fd(old)
        os.close(r), os.close(w)
        return None
    _state.wakeup = (r, w)
    return r, w


def _close_wakeup(fds: tuple[int, int]) -> None:
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    _state.wakeup = None
    for fd in fds:
        os.close(fd)


@contextmanager
def phase(
    what: str, run_dir: str | os.PathLike | None = None, trained: bool = False
) -> Iterator[None]:
    """Name what the process does in the block (``"during the final evaluation"``),
    the run directory it writes and whether training is over, for the line a stop
    prints."""
    before = _state.phase
    if run_dir is not None:
        _state.run_dir = run_dir
    _state.trained = _state.trained or trained
    _raise_if_requested()  # a stop swallowed in the phase before ends here
    _state.phase = what
    _log(what)
    yield  # a stop raised in the block keeps naming this phase
    _state.phase = before


def describe(stop: Stopped) -> str:
    """``SIGINT during ...; ...``: the signal, the phase and how to go on."""
    text = f"{stop.name} {_state.phase}"
    run_dir = _state.run_dir
    if run_dir is not None and (Path(run_dir) / "checkpoint.pt").is_file():
        text += f"; the checkpoint in {run_dir} is kept. Resume with: python -m "
        text += f"pyro_vae.fit --resume {shlex.quote(str(run_dir))}"
        if _state.trained:
            text += " (training is done: it redoes only the end of the run)"
        return text
    return f"{text}; no checkpoint was written yet: start the run again"


def _log(what: str) -> None:
    path = os.environ.get(PHASE_LOG)
    if path:
        with open(path, "a") as f:
            f.write(what + "\n")
