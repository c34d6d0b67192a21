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


def test_bench_ais_speed_times_both_passes(tmp_path):
    bench = _load("bench_ais")
    out = tmp_path / "bench_ais.json"
    argv = ["--chains", "3", "--leapfrog", "2", "--json", str(out), "speed"]
    argv += ["--cases", "digits 64-400-10", "--n", "4", "--steps", "3"]
    argv += ["--pilot-steps", "4", "--repeats", "1"]
    assert _float32(lambda: bench.main(argv)) == 0
    saved = json.loads(out.read_text())["speed"]
    assert saved["meta"]["dtype"] == "float32" and "1.3" in saved["target"]
    (row,) = saved["rows"]
    assert (row["n"], row["chains"], row["leapfrog"], row["steps"]) == (4, 3, 2, 3)
    for key in ("pyro_vae_seconds_per_transition", "reference_seconds_per_transition"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert math.isfinite(row["ratio"]) and 0 <= row["acceptance"] <= 1
    # The same draws and step sizes: the two passes agree chain by chain.
    assert row["fraction_of_chains_agreeing"] >= 0.9, row


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One epoch on digits, no evaluation: a run directory for bench_ais quality."""
    from pyro_vae.cli.fit import main as fit_main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    argv = ["--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--quiet"]
    assert fit_main([*argv, "--eval-k", "0", "--out", str(out)]) == 0
    return out


def test_bench_ais_quality_writes_is_ais_and_bdmc_rows(tmp_path, tiny_run):
    bench = _load("bench_ais")
    out = tmp_path / "bench_ais.json"
    out.write_text(json.dumps({"speed": {"kept": True}}))  # the other part stays
    argv = ["--chains", "2", "--leapfrog", "2", "--json", str(out), "quality"]
    argv += ["--run", str(tiny_run), "--n", "4", "--is-k", "10"]
    argv += ["--ais-steps", "2,3", "--bdmc-steps", "3", "--bdmc-n", "2"]
    assert _float32(lambda: bench.main(argv)) == 0
    saved = json.loads(out.read_text())
    assert saved["speed"] == {"kept": True}
    quality = saved["quality"]
    settings = quality["settings"]
    assert (settings["is_k"], settings["ais_steps"], settings["n"]) == (10, [2, 3], 4)
    assert (settings["chains"], settings["leapfrog"], settings["bdmc_n"]) == (2, 2, 2)
    (run,) = quality["runs"]
    assert run["dataset"] == "digits" and run["binarize"] == "dynamic"
    assert run["binarization"].startswith("dynamic") and run["n"] == 4
    is_row, *ais_rows = run["rows"]
    assert is_row["estimator"] == "IS" and is_row["k"] == 10
    assert 0 <= is_row["fraction_khat_above_0.7"] <= 1
    assert [r["steps"] for r in ais_rows] == [2, 3]
    for row in ais_rows:
        for key in ("log_px", "is_minus_ais"):
            assert all(math.isfinite(v) for v in row[key].values()), (key, row)
        assert 0 <= row["acceptance"]["mean"] <= 1 and row["seconds"] > 0
        assert -100 < row["log_px"]["mean"] < 0
    (sandwich,) = run["bdmc"]["rows"]
    assert sandwich["steps"] == 3 and math.isfinite(sandwich["gap"]["mean"])
    assert sandwich["lower"]["mean"] <= sandwich["upper"]["mean"] + 5
    assert "BDMC steps" in quality["table"] and "AIS, T = 3" in quality["table"]


def test_bench_ais_time_budget_skips_rows_it_cannot_afford():
    budget = _load("bench_ais").Budget(10.0)
    assert budget.skip("ais", 100) is None  # no rate yet: the first row runs
    budget.spent("ais", 100, 4.0)  # 0.04 s per unit of work, 6 s left
    assert budget.skip("ais", 100) is None
    assert "predicted 40 s" in budget.skip("ais", 1000)
    budget.spent("ais", 100, 7.0)
    assert budget.skip("bdmc", 1) == "the time budget is spent"
    assert _load("bench_ais").Budget(None).skip("ais", 1e12) is None


def _bench_mnist_argv(tmp_path, stages):
    argv = ["--rows", "vae", "iwae5", "--dataset", "digits", "--stages", str(stages)]
    argv += ["--max-epochs-per-stage", "2", "--eval-k", "10", "--eval-n", "20"]
    argv += ["--out", str(tmp_path / "runs"), "--json", str(tmp_path / "b.json")]
    return [*argv, "--device", "cpu"]


class _Stop(Exception):
    pass


def test_bench_mnist_trains_stage_by_stage_and_resumes(tmp_path, monkeypatch):
    bench = _load("bench_mnist")
    trained, stop_at = [], {}
    original = bench.PyroVAERow.train_epochs

    def counted(self, first, last, lr, on_epoch):
        name = "iwae5" if self.objective is not None else "vae"

        def hook(stats):
            on_epoch(stats)
            trained.append((name, stats["epoch"]))
            if stop_at.get(name) == stats["epoch"]:
                raise _Stop  # a kill after this epoch's partial.pt was written

        original(self, first, last, lr, hook)

    monkeypatch.setattr(bench.PyroVAERow, "train_epochs", counted)
    assert _float32(lambda: bench.main(_bench_mnist_argv(tmp_path, 0))) == 0
    assert trained == [("vae", 1), ("iwae5", 1)]
    # Stage 1 is epochs 2-3 under the cap of 2; the vae row stops after epoch 2.
    trained.clear()
    stop_at["vae"] = 2
    with pytest.raises(_Stop):
        _float32(lambda: bench.main(_bench_mnist_argv(tmp_path, 1)))
    assert (tmp_path / "runs" / "vae" / "partial.pt").is_file()
    trained.clear()
    stop_at.clear()
    assert _float32(lambda: bench.main(_bench_mnist_argv(tmp_path, 1))) == 0
    assert trained == [("vae", 3), ("iwae5", 2), ("iwae5", 3)]
    assert not (tmp_path / "runs" / "vae" / "partial.pt").exists()
    # The same command again trains nothing; --ais cross-checks the last stage.
    trained.clear()
    argv = _bench_mnist_argv(tmp_path, 1) + ["--ais", "3", "--ais-steps", "3"]
    argv += ["--ais-chains", "2", "--ais-leapfrog", "2"]
    assert _float32(lambda: bench.main(argv)) == 0
    assert trained == []
    saved = json.loads((tmp_path / "b.json").read_text())
    assert list(saved["rows"]) == ["vae", "iwae5"]
    for name, row in saved["rows"].items():
        assert [e["stage"] for e in row["curve"]] == [0, 1]
        assert [e["epochs"] for e in row["curve"]] == [1, 3]
        for entry in row["curve"]:
            test = entry["test"]
            assert (test["k"], test["n"]) == (10, 20)
            assert entry["seconds_per_epoch"] > 0 and math.isfinite(entry["lr"])
            assert 0 < test["nll"] < 100 and 0 < test["se"] < 5, (name, test)
            assert test["elbo"] <= -test["nll"] + 5 * test["se"]
        assert row["published"] > 80 and row["ais"]["stage"] == 1
        assert math.isfinite(row["ais"]["nll"]) and row["ais"]["n"] == 3
    assert [e["lr"] for e in saved["rows"]["vae"]["curve"]] == [
        1e-3,
        pytest.approx(1e-3 * 10 ** (-1 / 7)),
    ]
    assert "| vae | 0–1 | 3 |" in saved["table"] and "stage 1" in saved["table"]


def test_bench_mnist_skips_pythae_rows_it_cannot_install(tmp_path, monkeypatch):
    bench = _load("bench_mnist")
    monkeypatch.setattr(bench, "ensure_pythae", lambda install: "no package index")
    argv = _bench_mnist_argv(tmp_path, 0)
    argv[1:3] = ["pythae-vae"]
    assert _float32(lambda: bench.main(argv)) == 0
    row = json.loads((tmp_path / "b.json").read_text())["rows"]["pythae-vae"]
    assert row == {"row": "pythae-vae", "skipped": "no package index"}
