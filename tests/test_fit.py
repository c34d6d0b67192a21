"""The command line: a tiny run in-process writes every file with finite values."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.cli.fit import main, parse_args
from pyro_vae.training.checkpoint import load_checkpoint

TINY = ["--epochs", "2", "--hidden", "32", "--latent-dim", "2", "--quiet"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main([*TINY, "--out", str(out)]) == 0
    return out


def test_run_directory_holds_every_file(tiny_run):
    for name in ("config.json", "history.csv", "metrics.json", "checkpoint.pt"):
        assert (tiny_run / name).stat().st_size > 0, name
    for name in ("reconstructions.png", "samples.png", "elbo.png"):
        assert (tiny_run / "figures" / name).read_bytes()[:8] == PNG_MAGIC, name
    assert not list(tiny_run.glob(".*tmp")), "a temporary file was left behind"


def test_config_json_reruns_the_same_config(tiny_run):
    saved = FitConfig.from_dict(json.loads((tiny_run / "config.json").read_text()))
    assert saved == parse_args([*TINY, "--out", str(tiny_run)])


def test_history_and_metrics_are_finite_elbos(tiny_run):
    with open(tiny_run / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0])[:4] == ["epoch", "train_elbo", "valid_elbo", "seconds"]
    # for the ELBO objective the minimized loss is -ELBO
    assert [float(r["train_loss"]) for r in rows] == [
        -float(r["train_elbo"]) for r in rows
    ]
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for split in ("train", "valid", "test"):
        value = metrics[f"{split}_elbo"]
        # an ELBO of 64 Bernoulli pixels lies in (-inf, 0]; a sign error gives > 0
        assert math.isfinite(value) and -100 < value < 0, (split, value)
    assert metrics["n_train"] + metrics["n_valid"] + metrics["n_test"] == 1797
    assert metrics["device"] == "cpu"
    assert "nats per datum" in metrics["units"]
    assert metrics["binarization"].startswith("dynamic")
    assert {"torch", "pyro-ppl", "python"} <= set(metrics["versions"])


def test_checkpoint_restores_the_trained_networks(tiny_run):
    payload = load_checkpoint(tiny_run / "checkpoint.pt")
    cfg = FitConfig.from_dict(payload["config"])
    model, guide = build_model_and_guide(cfg, 64)
    model.load_state_dict(payload["model"])
    guide.load_state_dict(payload["guide"])
    assert payload["epoch"] == 2
    fresh, _ = build_model_and_guide(cfg, 64)
    trained = dict(model.named_parameters())
    assert any(
        not torch.equal(p, trained[name]) for name, p in fresh.named_parameters()
    )


def test_summary_table_is_printed(tmp_path, capsys):
    assert main(["--epochs", "1", "--hidden", "16", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "ELBO (nats per datum, higher is better)" in printed
    assert "test" in printed and str(tmp_path) in printed


@pytest.mark.parametrize(
    "extra",
    [
        ["--likelihood", "gaussian", "--sigma", "0.5"],
        ["--likelihood", "gaussian-learned", "--binarize", "static"],
        ["--elbo", "meanfield", "--num-particles", "3", "--hidden", "16,16"],
    ],
)
def test_other_settings_run(tmp_path, extra):
    assert main([*TINY, "--epochs", "1", "--out", str(tmp_path), *extra]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert math.isfinite(metrics["test_elbo"])


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--dataset", "--likelihood", "--num-particles", "--binarize", "--out"):
        assert flag in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--likelihood", "poisson"], "invalid choice: 'poisson' (choose from"),
        (["--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["--lr", "-1"], "--lr must be a positive"),
        (["--latent-dim", "0"], "--latent-dim must be >= 1"),
        (["--hidden", "4x4"], "--hidden takes comma-separated"),
    ],
)
def test_bad_flags_exit_two_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_batch_larger_than_data_is_refused(tmp_path, capsys):
    assert main(["--batch-size", "5000", "--out", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--batch-size 5000 exceeds the 1293 training data" in err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine with no GPU")
def test_cuda_asked_for_but_absent(tmp_path, capsys):
    assert main(["--device", "cuda", "--out", str(tmp_path), "--quiet"]) == 1
    assert "torch sees no CUDA GPU" in capsys.readouterr().err


def test_unknown_device(tmp_path, capsys):
    assert main(["--device", "tpu9", "--out", str(tmp_path), "--quiet"]) == 1
    assert "unknown device 'tpu9'" in capsys.readouterr().err


def test_same_seed_same_files(tmp_path):
    def run(name, seed):
        out = tmp_path / name
        argv = [*TINY, "--eval-k", "20", "--seed", str(seed), "--out", str(out)]
        assert main(argv) == 0
        with open(out / "history.csv", newline="") as f:
            history = [(r["train_elbo"], r["valid_elbo"]) for r in csv.DictReader(f)]
        metrics = json.loads((out / "metrics.json").read_text())
        numbers = {k: v for k, v in metrics.items() if k.endswith(("_elbo", "_px"))}
        return history, numbers

    first, again, other = run("a", 5), run("b", 5), run("c", 6)
    assert first == again
    assert first[0] != other[0]
    assert "test_log_px" in first[1]
