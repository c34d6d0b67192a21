"""``python -m pyro_vae.evaluate RUN_DIR --devices 2``: two gloo processes through
torchrun give the numbers and files of one process; bad process flags are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from pyro_vae.cli import runlock
from pyro_vae.cli.evaluate import main as eval_main
from pyro_vae.cli.fit import main as fit_main

# 11 data, IS data chunks of 3: IS shards [0, 6) and [6, 11), the second ending in a
# partial chunk; AIS shards (any alignment) [0, 6) and [6, 11)
COMMAND = [
    "--method", "both", "--k", "20", "--ais-steps", "3", "--chains", "2",
    "--leapfrog", "2", "--n", "11", "--data-chunk", "3",
]  # fmt: skip
TIMEOUT = 120  # seconds for one evaluation, torchrun's start included
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One epoch on digits; the evaluation is left to the tests (--eval-k 0)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    argv = ["--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--quiet"]
    assert fit_main([*argv, "--eval-k", "0", "--out", str(out)]) == 0
    return out


def evaluate(run_dir, *extra: str) -> subprocess.CompletedProcess:
    """``python -m pyro_vae.evaluate RUN_DIR COMMAND EXTRA`` in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env |= {"OMP_NUM_THREADS": "1", "PYRO_VAE_DIST_TIMEOUT": "60"}
    return subprocess.run(
        [sys.executable, "-m", "pyro_vae.evaluate", str(run_dir), *COMMAND, *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def read_json(run_dir) -> dict:
    return json.loads((run_dir / "evaluation.json").read_text())


def read_netcdf(run_dir) -> dict[str, np.ndarray]:
    """Every per-datum variable of evaluation.nc, and the posterior draws of z."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz as az

        idata = az.from_netcdf(str(run_dir / "evaluation.nc"))
        evaluation = idata["evaluation"]
        values = {name: evaluation[name].values for name in evaluation.data_vars}
        return values | {"z": idata["posterior"]["z"].values}


def without(summary: object, names: set[str]) -> object:
    """``summary`` with the keys in ``names`` removed at every depth."""
    if isinstance(summary, dict):
        return {k: without(v, names) for k, v in summary.items() if k not in names}
    if isinstance(summary, list):
        return [without(v, names) for v in summary]
    return summary


def test_two_processes_equal_one(trained_run, tmp_path):
    one, two = (shutil.copytree(trained_run, tmp_path / name) for name in "12")
    alone = evaluate(one)
    assert alone.returncode == 0, alone.stderr
    sharded = evaluate(two, "--devices", "2")
    assert sharded.returncode == 0, sharded.stderr
    assert "Traceback" not in sharded.stderr, sharded.stderr
    # rank 0 alone prints the table, once
    assert sharded.stdout.count("log p̂_AIS(x)") == 1, sharded.stdout

    a, b = read_netcdf(one), read_netcdf(two)
    assert a.keys() == b.keys() and {"log_px", "log_px_ais"} <= a.keys()
    assert len(a["log_px"]) == 11
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6, err_msg=name)

    first, second = read_json(one), read_json(two)
    assert first["chunks"] == {"data": 3, "particles": 20, "processes": 1}
    assert second["chunks"] == {**first["chunks"], "processes": 2}
    assert first["ais"]["chunks"]["processes"] == 1
    assert second["ais"]["chunks"]["processes"] == 2
    # everything else, the checks and latent diagnostics of all 11 data included,
    # is the same (up to float32 noise in the last digits)
    strip = {"seconds", "chunks"}
    _assert_close(without(first, strip), without(second, strip))
    assert sorted(p.name for p in (two / "figures").glob("*.png")) == sorted(
        p.name for p in (one / "figures").glob("*.png")
    )


def _assert_close(a: object, b: object, path: str = "") -> None:
    """Nested JSON values equal, numbers within 1e-6 (relative or absolute)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            _assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _assert_close(u, v, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-6), path
    else:
        assert a == b, path


def test_a_failed_process_is_named_and_a_status(trained_run, tmp_path):
    """Rank 0 cannot lock a run in use: it says why, the launcher that it failed."""
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    with runlock.scope("test"):
        runlock.acquire(run_dir, "fit")  # as a fit --resume running there would
        failed = evaluate(run_dir, "--devices", "2")
    assert failed.returncode != 0
    assert "pyro_vae/cli" not in failed.stderr, failed.stderr  # no traceback of ours
    assert "is in use" in failed.stderr, failed.stderr  # rank 0's reason
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: evaluating ") and "on 2 processes stopped" in last
    assert not (run_dir / "evaluation.json").exists()


def test_a_path_that_is_no_run_stops_before_torchrun(tmp_path, capsys):
    assert eval_main([str(tmp_path), "--devices", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint at ") and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--devices", "0"], "--devices: must be a positive integer, got 0"),
        (["--devices", "two"], "--devices: must be a positive integer, got 'two'"),
        (["--num-nodes", "-1"], "--num-nodes: must be a positive integer, got -1"),
        (["--data-chunk", "0"], "--data-chunk: must be a positive integer, got 0"),
        (
            ["--devices", "2", "--device", "cuda:0"],
            "--device cuda:0 names one GPU; with several processes use --device cuda",
        ),
    ],
)
def test_bad_process_flags_exit_2(tmp_path, capsys, args, phrase):
    assert eval_main([str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert phrase in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no usage block
