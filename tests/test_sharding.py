"""Sharded evaluation (pyro_vae.cli.sharding): shards, merges, and two processes.

Shards cover the data once at aligned boundaries; merging the shards of a result
gives back the whole; log p(x) of a shard seeded with its offset is those rows of a
whole run; and two gloo processes (tests/sharding_worker.py) compute importance
sampling and AIS equal to one process, and report a shard that fails or a process
that dies.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyro_vae.cli.sharding import (
    merge_ais,
    merge_log_marginal,
    merge_results,
    shard_bounds,
    sharded,
)
from pyro_vae.evaluate.ais import ais_log_marginal
from pyro_vae.evaluate.marginal import log_marginal
from pyro_vae.training.distributed import launch_command

WORKER = Path(__file__).with_name("sharding_worker.py")
TIMEOUT = 150  # seconds for one launch: generous for a busy 2-core CI machine


def _worker():
    spec = importlib.util.spec_from_file_location("sharding_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _worker()


# -- shards -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "world", "align"),
    [(7, 2, 3), (7, 3, 3), (10_000, 8, 100), (2, 2, 3), (150, 4, 100), (1, 5, 1)],
)
def test_shards_cover_the_data_once_at_aligned_boundaries(n, world, align):
    bounds = [shard_bounds(n, r, world, align) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (_, hi), (lo, _) in zip(bounds, bounds[1:], strict=False):
        assert hi == lo  # contiguous, in rank order
    covered = [i for lo, hi in bounds for i in range(lo, hi)]
    assert covered == list(range(n))
    assert all(lo % align == 0 for lo, hi in bounds if hi > lo)
    assert all(abs((hi - lo) - n / world) <= align for lo, hi in bounds)


def test_shards_are_even_and_may_be_empty():
    assert [shard_bounds(7, r, 2, 3) for r in range(2)] == [(0, 3), (3, 7)]
    assert [shard_bounds(10_000, r, 4, 100) for r in range(4)] == [
        (0, 2500),
        (2500, 5000),
        (5000, 7500),
        (7500, 10_000),
    ]
    assert [shard_bounds(2, r, 2, 3) for r in range(2)] == [(0, 0), (0, 2)]
    assert shard_bounds(0, 0, 3, 100) == (0, 0)
    for bad in ((-1, 0, 2, 1), (5, 2, 2, 1), (5, 0, 0, 1), (5, 0, 2, 0)):
        with pytest.raises(ValueError, match="shard_bounds needs|is not one of"):
            shard_bounds(*bad)


# -- merges -----------------------------------------------------------------------


def _assert_same(a, b):
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name in ("seconds", "chunks"):
            continue
        if isinstance(x, dict):
            assert x.keys() == y.keys(), f.name
            for key in x:
                torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)
        elif isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        else:
            assert x == y, f.name


@pytest.fixture(scope="module")
def ppca():
    return worker.problem()


def test_merging_the_halves_of_a_result_gives_the_whole(ppca):
    model, guide, x = ppca
    whole = log_marginal(model, guide, x, 40, data_chunk=3, seed=1)
    halves = [_rows(whole, 0, 3), None, _rows(whole, 3, 7)]
    merged = merge_log_marginal(halves)
    _assert_same(merged, whole)
    assert merged.chunks == {**whole.chunks, "processes": 3}
    ais = ais_log_marginal(model, guide, x, **worker.AIS, seed=1)
    merged = merge_results([_ais_rows(ais, 0, 4), _ais_rows(ais, 4, 7)])
    _assert_same(merged, ais)
    assert merged.chunks["processes"] == 2
    with pytest.raises(ValueError, match="all 2 shards were empty"):
        merge_ais([None, None])
    with pytest.raises(TypeError, match="LogMarginal or AISResult"):
        merge_results([whole, ais])
    with pytest.raises(ValueError, match="different K"):
        merge_log_marginal([whole, dataclasses.replace(whole, k=41)])


def test_one_process_runs_the_whole_range():
    assert sharded(None, lambda lo, hi: (lo, hi), 7, align=3) == (0, 7)


def test_evaluate_relaunches_itself_through_torchrun():
    cmd = launch_command(["run", "--devices", "2"], 2, 1, module="pyro_vae.evaluate")
    assert cmd[-6:] == ["-m", "--", "pyro_vae.evaluate", "run", "--devices", "2"]
    assert launch_command([], 2, 1)[-3:] == ["-m", "--", "pyro_vae.fit"]  # default


def _rows(r, lo, hi):
    cut = {
        f.name: getattr(r, f.name)[lo:hi]
        for f in dataclasses.fields(r)
        if isinstance(getattr(r, f.name), torch.Tensor)
    }
    cut["iwae"] = {g: v[lo:hi] for g, v in r.iwae.items()}
    cut["iwae_se"] = {g: v[lo:hi] for g, v in r.iwae_se.items()}
    return dataclasses.replace(r, **cut)


def _ais_rows(r, lo, hi):
    return dataclasses.replace(
        r,
        log_px=r.log_px[lo:hi],
        log_px_se=r.log_px_se[lo:hi],
        acceptance=r.acceptance[lo:hi],
        log_weights=r.log_weights[:, lo:hi],
        step_sizes=r.step_sizes[..., lo:hi],
    )


# -- a shard seeded by its offset ----------------------------------------------------


def test_a_shard_with_its_index_offset_is_those_rows_of_the_whole(ppca):
    model, guide, x = ppca
    whole = log_marginal(model, guide, x, 40, data_chunk=3, seed=5)
    shard = log_marginal(model, guide, x[3:7], 40, data_chunk=3, seed=5, index_offset=3)
    _assert_same(shard, _rows(whole, 3, 7))
    # without the offset the shard draws what the first data drew: other numbers
    unshifted = log_marginal(model, guide, x[3:7], 40, data_chunk=3, seed=5)
    assert not torch.equal(unshifted.log_px, shard.log_px)


# -- two processes ----------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(*args, world=2):
    """Run the worker on ``world`` processes as torchrun would; (status, err) each."""
    port, procs = _free_port(), []
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    for rank in range(world):
        env = {
            **base,
            "OMP_NUM_THREADS": "1",
            "PYRO_VAE_DIST_TIMEOUT": "60",
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
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


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "merged.pt"
    results = _spawn("equal", out)
    assert [status for status, _ in results] == [0, 0], results
    assert all("Traceback" not in err for _, err in results), results
    two = torch.load(out)
    one = worker.evaluate(None)
    for part in ("is", "ais", "few"):
        assert two[part].keys() == one[part].keys()
        for name, value in one[part].items():
            torch.testing.assert_close(
                two[part][name], value, rtol=0, atol=1e-10, equal_nan=True
            )
    assert two["chunks"]["is"] == {**one["chunks"]["is"], "processes": 2}
    assert two["chunks"]["few"]["processes"] == 2  # rank 0's shard was empty
    assert two["ais"]["log_weights"].shape == (3, 7)


@pytest.mark.parametrize("fault", ["raise", "die"])
def test_a_failing_shard_is_named_on_rank_0(tmp_path, fault):
    out = tmp_path / "error"
    results = _spawn(fault, out)
    assert results[0][0] == 0, results  # rank 0 caught the error and wrote it
    rank0 = Path(f"{out}.rank0").read_text()
    if fault == "raise":
        assert rank0.startswith("DistributedError: rank 1 of 2 failed on its shard")
        assert "(data 3 to 6): ValueError: a bug in shard 1" in rank0, rank0
        assert Path(f"{out}.rank1").read_text() == "ValueError: a bug in shard 1"
    else:
        assert results[1][0] == 1, results
        assert rank0.startswith("DistributedError: rank 0 of 2 lost the other"), rank0
        assert "finish their shards: rank 1 (pid" in rank0, rank0
