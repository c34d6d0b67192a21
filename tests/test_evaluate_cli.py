"""``python -m pyro_vae.evaluate RUN_DIR`` in-process, on a tiny trained run."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest

from pyro_vae.cli.evaluate import main as eval_main
from pyro_vae.cli.fit import main as fit_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = ["--k", "50", "--n", "20"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One epoch on digits; the evaluation is left to the tests (--eval-k 0)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    argv = ["--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--quiet"]
    assert fit_main([*argv, "--eval-k", "0", "--out", str(out)]) == 0
    assert not (out / "evaluation.json").exists()
    return out


@pytest.fixture
def run_dir(trained_run, tmp_path):
    """A private copy of the run, so that each test's evaluation files are its own."""
    return shutil.copytree(trained_run, tmp_path / "run")


def read_json(run_dir) -> dict:
    return json.loads((run_dir / "evaluation.json").read_text())


def numbers(summary: dict) -> dict:
    """The estimates of an evaluation.json, without its timing."""
    return {key: value for key, value in summary.items() if key != "seconds"}


def test_evaluation_files(run_dir, capsys):
    assert eval_main([str(run_dir), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "log p̂(x)" in printed and "ELBO" in printed and "IWAE_10" in printed

    summary = read_json(run_dir)
    assert summary["k"] == 50 and summary["n"] == 20
    assert summary["split"] == "test"
    assert summary["binarization"].startswith("dynamic")
    assert {"elbo", "log_px", "gap", "iwae", "khat", "ess", "seconds"} <= set(summary)
    assert sorted(summary["iwae"], key=int) == ["1", "10", "50"]
    for name in ("elbo", "log_px", "gap", *(f"iwae.{k}" for k in summary["iwae"])):
        entry = summary["iwae"][name[5:]] if name.startswith("iwae.") else summary[name]
        assert math.isfinite(entry["mean"]) and 0 < entry["se"] < 1, (name, entry)
    elbo, log_px = summary["elbo"]["mean"], summary["log_px"]["mean"]
    # 64 Bernoulli pixels after one epoch: measured ELBO -43.6, log p̂ -43.2 nats.
    assert -100 < elbo <= log_px < 0, (elbo, log_px)
    assert summary["gap"]["mean"] == pytest.approx(log_px - elbo, abs=1e-9)
    # IWAE_1 is the ELBO and IWAE_K is log p̂(x), from the same weights.
    assert summary["iwae"]["1"] == summary["elbo"]
    assert summary["iwae"]["50"] == summary["log_px"]
    assert summary["iwae"]["10"]["mean"] <= log_px + 3 * summary["log_px"]["se"]
    khat = summary["khat"]
    assert khat["not_fitted"] == 0 and math.isfinite(khat["max"])
    assert 0 <= khat["fraction_above_0.7"] <= khat["fraction_above_0.5"] <= 1
    assert 1 <= summary["ess"]["min"] <= summary["ess"]["mean"] <= 50
    assert summary["consistency_violations_within_chance"] == {
        "ELBO<=IWAE_1": 0,
        "IWAE_1<=IWAE_10": 0,
        "IWAE_10<=IWAE_50": 0,
        "IWAE_50<=log p̂(x)": 0,
    }

    for name in ("iwae_vs_k.png", "khat.png"):
        assert (run_dir / "figures" / name).read_bytes()[:8] == PNG_MAGIC, name
    assert not list(run_dir.glob(".*tmp")), "a temporary file was left behind"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz as az

        idata = az.from_netcdf(str(run_dir / "evaluation.nc"))
        z = idata.posterior["z"].values
        evaluation = idata["evaluation"]
        per_datum = {name: evaluation[name].values for name in ("log_px", "elbo")}
        k_attr = evaluation.attrs["K"]
    assert z.shape == (1, 8, 20, 2)  # chain, draw, datum, latent
    assert all(math.isfinite(v) for v in z.ravel())
    assert per_datum["log_px"].shape == per_datum["elbo"].shape == (20,)
    assert per_datum["log_px"].mean() == pytest.approx(log_px, rel=1e-12)
    assert per_datum["elbo"].mean() == pytest.approx(elbo, rel=1e-12)
    assert k_attr == 50


def test_splits(run_dir, trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert eval_main([str(run_dir), "--k", "20", "--split", "valid"]) == 0
    summary = read_json(run_dir)
    assert summary["split"] == "valid" and summary["n"] == metrics["n_valid"]
    assert summary["n"] > 100  # the whole split (144 of digits' 1797)
    assert math.isfinite(summary["log_px"]["mean"])

    assert eval_main([str(run_dir), "--k", "20", "--split", "train", "--n", "30"]) == 0
    summary = read_json(run_dir)
    assert summary["split"] == "train" and summary["n"] == 30
    assert math.isfinite(summary["log_px"]["mean"])


def test_same_seed_same_numbers(run_dir):
    assert eval_main([str(run_dir), *FAST, "--seed", "7"]) == 0
    first = read_json(run_dir)
    assert eval_main([str(run_dir), *FAST, "--seed", "7"]) == 0
    assert numbers(read_json(run_dir)) == numbers(first)
    assert eval_main([str(run_dir), *FAST, "--seed", "8"]) == 0
    other = read_json(run_dir)
    assert other["log_px"]["mean"] != first["log_px"]["mean"]
    assert other["elbo"]["mean"] != first["elbo"]["mean"]


def _fails(argv, capsys, status, *phrases):
    assert eval_main(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in err, err
    return err


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--k", "0"], "must be a positive integer"),
        (["--k", "-5"], "must be a positive integer"),
        (["--n", "0"], "must be a positive integer"),
        (["--k", "many"], "--k"),
        (["--split", "foo"], "invalid choice"),
    ],
    ids=["k0", "k-5", "n0", "k-text", "split"],
)
def test_bad_arguments_exit_2(trained_run, capsys, args, phrase):
    _fails([str(trained_run), *args], capsys, 2, phrase)
    assert not (trained_run / "evaluation.json").exists()


def test_directory_without_checkpoint(tmp_path, capsys):
    _fails([str(tmp_path), *FAST], capsys, 1, "no checkpoint")


def test_missing_directory(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    _fails([str(missing), *FAST], capsys, 1, str(missing), "not a directory")
    assert not missing.exists()


def test_truncated_checkpoint(run_dir, capsys):
    checkpoint = run_dir / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    _fails([str(run_dir), *FAST], capsys, 1, "truncated or corrupt")
    assert not (run_dir / "evaluation.json").exists()


def test_one_sample_per_datum(run_dir, capsys):
    status = eval_main([str(run_dir), "--k", "1", "--n", "5"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert status == 2 and "--k" in err and "at least 2" in err


def test_huge_seed(run_dir, capsys):
    status = eval_main([str(run_dir), *FAST, "--seed", str(10**14)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert status == 0
