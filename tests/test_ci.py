""".ci/run refuses a disk too small for its venv, with a message, and leaves nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def test_ci_stops_before_pip_when_the_disk_is_nearly_full(tmp_path):
    if not FASHION.is_file():  # .ci/run would apt-get it first
        pytest.skip("apt-get install dataset-fashion-mnist")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "df").write_text(
        "#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted'\n"
        "echo '/dev/x 1000000 998976 1024 99% /'\n"
    )
    (fake / "df").chmod(0o755)
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    env["TMPDIR"] = str(scratch_root)
    done = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "1 MiB free under" in done.stderr
    assert "needs about 6 GiB" in done.stderr and "TMPDIR" in done.stderr
    assert list(scratch_root.iterdir()) == []  # the trap removed its scratch folder
