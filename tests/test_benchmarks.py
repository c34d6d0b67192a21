"""The benchmark scripts still run end to end (tiny settings; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pyro
import pytest
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


def _float32(fn):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        return fn()
    finally:
        torch.set_default_dtype(old)
        pyro.settings.set(module_local_params=True)


def test_bench_quality_writes_a_consistent_row_per_config(tmp_path):
    fashion = Path("/usr/share/datasets/fashion-mnist")
    if not (fashion / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"missing Fashion-MNIST in {fashion}")
        pytest.skip("apt-get install dataset-fashion-mnist")
    bench = _load("bench_quality")
    out = tmp_path / "bench_quality.json"
    names = ["Gaussian guide, N(0, I) prior (MLP 400)", "VampPrior (500 pseudo-inputs)"]
    argv = ["--configs", *names, "--epochs", "1", "--n-eval", "20", "--k", "20"]
    assert _float32(lambda: bench.main([*argv, "--json", str(out)])) == 0
    saved = json.loads(out.read_text())
    assert [r["config"] for r in saved["rows"]] == names
    for row in saved["rows"]:  # log_marginal's own ELBO <= log p̂ check passed inside
        assert row["test_elbo"] <= row["test_log_px"] + 5 * row["test_log_px_se"]
        assert -400 < row["test_log_px"] < -150, row
    assert names[1] in saved["table"] and "pythae" in saved["table"]


def test_bench_evaluate_times_both_estimators(tmp_path):
    bench = _load("bench_evaluate")
    out = tmp_path / "bench_evaluate.json"
    argv = ["--cases", "digits 64-400-10", "--k", "16", "--n", "12", "--repeats", "1"]
    argv += ["--data-chunk", "5", "--json", str(out)]
    _float32(lambda: bench.main(argv))
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["k"], row["n"]) == (16, 12)
    assert row["pyro_vae_seconds"] > 0 and math.isfinite(row["ratio"])
