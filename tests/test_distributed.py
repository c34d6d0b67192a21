"""Data-parallel training on two CPU processes (gloo): tests/distributed_worker.py.

Two processes train one model and end with bitwise identical parameters; their
validation ELBO matches single-process training within 5 standard errors over seeds
(and the same check tells half the steps apart); a process that dies stops the other
with a message and a whole checkpoint, from which two processes resume; and
``python -m pyro_vae.fit --devices 2`` writes one run directory through torchrun.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyro_vae.cli.config import FitConfig
from pyro_vae.cli.fit import parse_command
from pyro_vae.errors import ConfigError
from pyro_vae.training import distributed
from pyro_vae.training.checkpoint import load_checkpoint
from pyro_vae.training.distributed import DistContext, DistributedError

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT = 150  # seconds for one launch: generous for a busy 2-core CI machine
TINY = ["--hidden", "32", "--latent-dim", "3", "--quiet"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "PYRO_VAE_DIST_TIMEOUT": "60", **extra}


def _spawn(*args, world=2):
    """Run the worker on ``world`` processes as torchrun would; (status, err) each."""
    port, procs = _free_port(), []
    for rank in range(world):
        env = _env(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), *map(str, args)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline, results = time.monotonic() + TIMEOUT, []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, err))
    finally:
        for proc in procs:  # never leave a process behind, even on a timeout
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def _worker_module():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clean(err):
    """No traceback and no warning in a process's stderr.

    But torch's own note that ``torch.jit.trace`` is deprecated, which the fast step
    passes on as torch raised it (pyro_vae.training.step).
    """
    lines = err.splitlines()
    kept = [
        line
        for i, line in enumerate(lines)
        if "is deprecated. Please switch to `torch.compile`" not in line
        and not (
            line.strip() == "warnings.warn(" and i and "deprecated" in lines[i - 1]
        )
    ]
    err = "\n".join(kept)
    return "Traceback" not in err and "Warning" not in err


# -- two processes train together -------------------------------------------------


def test_two_processes_end_with_identical_parameters(tmp_path):
    results = _spawn("params", tmp_path)
    assert [status for status, _ in results] == [0, 0], results
    assert all(_clean(err) for _, err in results), results
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for part in ("model", "guide"):
        assert rank0[part].keys() == rank1[part].keys()
        for name, value in rank0[part].items():
            # bitwise: the same averaged gradients and Adam steps on both processes
            assert torch.equal(value, rank1[part][name]), (part, name)

    # the epoch statistics are sums over both shards: the same on both processes
    def numbers(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert numbers(rank0["history"]) == numbers(rank1["history"])
    assert [h["step"] for h in rank0["history"]] == [13, 26]  # 1293 data, batch 100
    assert all(math.isfinite(h["valid_elbo"]) for h in rank0["history"])


def test_a_nan_on_one_process_is_never_stepped_on(tmp_path):
    """Rank 1's NaN loss reaches DDP's averaged gradients; no process steps on it.

    Had either process taken the step, the averaged NaN gradient would have made
    its parameters NaN; they stay finite, and equal on both processes.
    """
    results = _spawn("nan-params", tmp_path)
    assert [status for status, _ in results] == [0, 0], results
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for state in (rank0, rank1):
        assert (
            "not finite on at least one of the 2 processes at epoch 2, step 20"
            in (state["message"])
        ), state["message"]
    for part in ("model", "guide"):
        for name, value in rank0[part].items():
            assert torch.isfinite(value).all(), (part, name)
            assert torch.equal(value, rank1[part][name]), (part, name)


def test_validation_elbo_matches_single_process_training(tmp_path):
    seeds, epochs = range(6), 5
    results = _spawn("elbo", tmp_path / "elbo.json", epochs, *seeds)
    assert [status for status, _ in results] == [0, 0], results
    two = json.loads((tmp_path / "elbo.json").read_text())
    worker = _worker_module()
    one = worker.valid_elbos(seeds, epochs)
    # same seeds, same global batch: the same optimization, different random draws
    diff = statistics.mean(two) - statistics.mean(one)
    se = math.sqrt(statistics.variance(two) / len(two) + statistics.variance(one) / 6)
    assert abs(diff) < 5 * se, (two, one, diff, se)
    # The check can fail: the same runs with the global batch doubled (half the steps,
    # what two processes taking --batch-size each would do) are > 5 se away.
    half = worker.valid_elbos(seeds, epochs, batch_size=200)
    se_half = math.sqrt(statistics.variance(half) / 6 + statistics.variance(one) / 6)
    assert abs(statistics.mean(half) - statistics.mean(one)) > 5 * se_half, half


# -- failures and resume ----------------------------------------------------------


def test_a_dying_process_stops_the_other_cleanly_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--devices", "2", "--eval-k", "0", "--batch-size", "20"]
    # 647 data per process at 10 per step: 65 steps per epoch; rank 1 dies in epoch 3
    results = _spawn("fit", "exit", 1, 150, *args, "--epochs", "20", "--out", out)
    (status0, err0), (status1, _) = results
    assert status1 == 1 and status0 == 1, results
    assert "Traceback" not in err0, err0
    assert "rank 0 of 2 lost the other processes while training" in err0, err0
    assert "rank 1 (pid" in err0 and "exited" in err0, err0
    assert f"resume with: python -m pyro_vae.fit --resume {out}" in err0, err0
    # a whole checkpoint of the last finished epoch, and no temporary file left
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    with open(out / "history.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
    # both processes load rank 0's checkpoint and carry on (not bit-exact)
    results = _spawn("fit", "none", 0, 0, "--resume", out, "--epochs", "3", "--quiet")
    assert [status for status, _ in results] == [0, 0], results
    assert all(_clean(err) for _, err in results), results
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and math.isfinite(metrics["valid_elbo"])


def test_a_nan_on_one_process_stops_both_before_the_step(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--devices", "2", "--eval-k", "0", "--batch-size", "20"]
    # rank 1's loss turns NaN at its step 100 (epoch 2 of 65 steps)
    results = _spawn("fit", "nan", 1, 100, *args, "--epochs", "5", "--out", out)
    assert [status for status, _ in results] == [1, 1], results
    for _, err in results:  # both stop at the same step, with the same message
        assert "Traceback" not in err, err
        assert (
            "the loss is not finite on at least one of the 2 processes at epoch 2, "
            "step 100; no step was taken on it"
        ) in err, err
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# -- the command line through torchrun --------------------------------------------


def test_fit_devices_2_writes_one_run_directory(tmp_path):
    cmd = [sys.executable, "-m", "pyro_vae.fit", *TINY, "--devices", "2"]
    proc = subprocess.run(
        [*cmd, "--epochs", "1", "--eval-k", "20"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert _clean(proc.stderr), proc.stderr
    (run,) = (tmp_path / "runs").iterdir()  # one run directory, named by the parent
    assert run.name.startswith("digits-")
    for name in ("config.json", "history.csv", "metrics.json", "checkpoint.pt"):
        assert (run / name).stat().st_size > 0, name
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["processes"] == 2 and math.isfinite(metrics["test_log_px"])
    saved = json.loads((run / "config.json").read_text())
    assert (saved["devices"], saved["num_nodes"]) == (2, 1)


# -- the parts, in one process ----------------------------------------------------


def _ctx(rank, world=2, seed=0):
    return DistContext(rank, world, rank, world, torch.device("cpu"), "gloo", seed)


def test_shards_deal_one_permutation_per_epoch():
    n, world, local = 103, 2, 10
    orders = [_ctx(r, world).shard_order(n, epoch=1) for r in range(world)]
    assert [len(o) for o in orders] == [52, 52]  # padded by one repeated index
    dealt = torch.stack(orders, dim=1).reshape(-1)  # rank r takes r, r + W, ...
    assert sorted(dealt[:n].tolist()) == list(range(n))
    # local batch k of every rank together is global batch k of that permutation
    batch = torch.cat([o[local : 2 * local] for o in orders])
    assert sorted(batch.tolist()) == sorted(dealt[2 * local : 4 * local].tolist())
    again = _ctx(0, world).shard_order(n, epoch=1)
    assert torch.equal(again, orders[0])  # the same on every process that asks
    assert not torch.equal(_ctx(0, world).shard_order(n, epoch=2), orders[0])
    assert not torch.equal(_ctx(0, world, seed=1).shard_order(n, epoch=1), orders[0])


def test_global_batch_must_divide_by_the_processes():
    assert _ctx(0, 4).local_batch_size(100) == 25
    with pytest.raises(ConfigError, match="must divide by the 3 processes"):
        _ctx(0, 3).local_batch_size(100)
    with pytest.raises(ConfigError, match="global batch"):
        FitConfig(devices=3)
    for bad in ({"devices": 0}, {"num_nodes": 0}):
        with pytest.raises(ConfigError, match="must be >= 1"):
            FitConfig(**bad)
    with pytest.raises(ConfigError, match="names one GPU"):
        FitConfig(devices=2, device="cuda:1")


def test_collective_failures_become_clear_errors_and_bugs_do_not():
    ctx = _ctx(0)
    lost = ctx.lost_contact(
        RuntimeError("[gloo/pair.cc:534] Connection closed by peer [127.0.0.1]:1"),
        "training",
    )
    assert isinstance(lost, DistributedError)
    assert "rank 0 of 2 lost the other processes while training" in str(lost)
    assert "rank 1 died or hung" in str(lost)
    assert ctx.lost_contact(RuntimeError("mat1 and mat2 shapes differ"), "x") is None
    with pytest.raises(RuntimeError, match="shapes"), ctx.guard("x"):
        raise RuntimeError("mat1 and mat2 shapes differ")


def test_launch_command_and_multi_node_environment(monkeypatch):
    cmd = distributed.launch_command(["--epochs", "1"], 4, 1)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--standalone" in cmd and cmd[cmd.index("--nproc-per-node") + 1] == "4"
    assert cmd[-5:] == ["-m", "--", "pyro_vae.fit", "--epochs", "1"]
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT, NODE_RANK"):
        distributed.launch_command([], 2, 3)
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("NODE_RANK", "2")
    cmd = distributed.launch_command([], 2, 3)
    assert "--standalone" not in cmd
    for flag, value in [("--nnodes", "3"), ("--node-rank", "2")]:
        assert cmd[cmd.index(flag) + 1] == value
    assert cmd[cmd.index("--master-addr") + 1 : cmd.index("--master-port") + 2] == [
        "node0",
        "--master-port",
        "29500",
    ]


def test_several_nodes_need_one_named_run_directory(monkeypatch, capsys):
    from pyro_vae.cli.fit import main

    for name, value in {
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "1",
        "NODE_RANK": "0",
    }.items():
        monkeypatch.setenv(name, value)
    assert main(["--num-nodes", "2", "--device", "cpu"]) == 1
    assert "--num-nodes 2 needs --out DIR, the same on every node" in (
        capsys.readouterr().err
    )


def test_devices_may_change_on_resume(tmp_path):
    from pyro_vae.cli.fit import main

    out = tmp_path / "r"
    assert main([*TINY, "--epochs", "1", "--eval-k", "0", "--out", str(out)]) == 0
    cfg, resume = parse_command(["--resume", str(out), "--devices", "2"])
    assert cfg.devices == 2 and resume == str(out)
