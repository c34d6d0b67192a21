"""Starting the processes: ``python -m pyro_vae.fit`` (or another module) on W
processes through torchrun.

Used before any process group exists: :func:`needs_launch` tells the command line to
re-run itself through ``torchrun`` (:func:`launch`), and :func:`launched` tells a
process that ``torchrun`` started it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from pyro_vae.errors import ConfigError

__all__ = ["cpu_cores", "launch", "launch_command", "launched", "needs_launch"]


def launched() -> bool:
    """True inside a process that ``torchrun`` (or another launcher) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_launch(devices: int, num_nodes: int) -> bool:
    """More than one process is asked for and this one is not one of them yet."""
    return devices * num_nodes > 1 and not launched()


def cpu_cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def launch_command(
    argv: Sequence[str], devices: int, num_nodes: int, module: str = "pyro_vae.fit"
) -> list[str]:
    """The ``torchrun`` command running ``python -m MODULE ARGV`` on W processes.

    The module and its arguments follow ``--``, so that torchrun parses none of
    them. One node uses ``--standalone`` (a local rendezvous on a free port). Several
    nodes use a static rendezvous: ``MASTER_ADDR``, ``MASTER_PORT`` (of node 0) and
    ``NODE_RANK`` (0 .. M-1) must be set on every node.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(devices),
        "--nnodes",
        str(num_nodes),
    ]
    if num_nodes == 1:
        cmd.append("--standalone")
    else:
        needed = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
        missing = [name for name in needed if not os.environ.get(name)]
        if missing:
            raise ConfigError(
                f"--num-nodes {num_nodes} needs {', '.join(missing)} set on every "
                "node: MASTER_ADDR and MASTER_PORT of node 0, and NODE_RANK 0.."
                f"{num_nodes - 1} (or launch torchrun yourself, see README.md)"
            )
        cmd += [
            "--node-rank",
            os.environ["NODE_RANK"],
            "--master-addr",
            os.environ["MASTER_ADDR"],
            "--master-port",
            os.environ["MASTER_PORT"],
        ]
    # "--": torchrun's parser takes nothing after it as its own option; without it an
    # argument that abbreviates several of its options (evaluate's --n: --nnodes,
    # --node-rank, ...) stops torchrun with "ambiguous option"
    return [*cmd, "-m", "--", module, *argv]


def launch(
    argv: Sequence[str], devices: int, num_nodes: int, module: str = "pyro_vae.fit"
) -> int:
    """Run ``python -m MODULE ARGV`` on ``devices`` processes through torchrun.

    ``module`` is ``pyro_vae.fit`` (training) or ``pyro_vae.evaluate`` (sharded
    evaluation). Each process gets ``OMP_NUM_THREADS = cores // devices`` unless it
    is set. This process waits; Ctrl-C reaches the workers directly (training stops
    after the current step and rank 0 writes a checkpoint), and SIGTERM is passed on
    to torchrun.

    Returns:
        torchrun's exit status (0 when every process succeeded), or 128 + the
        signal's number when a signal stopped the run (130 for SIGINT).
    """
    cmd = launch_command(argv, devices, num_nodes, module)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores() // devices)))
    proc = subprocess.Popen(cmd, env=env)
    caught: list[int] = []

    def note(signum: int, frame: object) -> None:
        # Ctrl-C reaches torchrun and the workers from the terminal by itself
        caught.append(signum)
        if signum != signal.SIGINT:
            proc.send_signal(signum)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, note)
    except ValueError:  # not the main thread
        pass
    try:
        status = proc.wait()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if status and caught:  # as a single process would exit: 130, 143
        return 128 + caught[0]
    return status
