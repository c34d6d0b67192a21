"""The benchmark scripts still run end to end (tiny settings; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pyro
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_times_every_path(tmp_path):
    bench = _load("bench_train")
    out = tmp_path / "bench_train.json"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        argv = ["--steps", "3", "--warmup", "1", "--repeats", "1", "--batches", "16"]
        argv += ["--skip-epochs", "--no-compile", "--json", str(out)]
        assert bench.main(argv) == 0
    finally:
        torch.set_default_dtype(old)
        pyro.settings.set(module_local_params=True)
    rows = json.loads(out.read_text())["steps"]
    paths = [r["path"] for r in rows]
    assert paths[0] == "pyro_vae train()" and "plain PyTorch (reference)" in paths
    assert "Pyro JitTraceMeanField_ELBO (SVI)" in paths
    broken = {r["path"]: r["error"] for r in rows if r["error"]}
    assert not broken
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in rows)
    reference = next(r for r in rows if r["path"] == "plain PyTorch (reference)")
    assert reference["ratio"] == 1.0
