"""Figures and the run report: every figure drawn, shown in report.md, rebuildable."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.cli.figures import FLIP_RATE, add_noise
from pyro_vae.cli.fit import main
from pyro_vae.cli.generate import decode, encode_mean, interpolate
from pyro_vae.cli.report import FIGURE_ORDER
from pyro_vae.cli.report import main as report_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "two_d"
    argv = ["--latent-dim", "2", "--epochs", "2", "--hidden", "32", "--eval-k", "50"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    return out


def test_every_figure_is_drawn_and_in_the_report(run_2d):
    report = (run_2d / "report.md").read_text()
    for name, caption in FIGURE_ORDER:
        if name in ("is_vs_ais", "bdmc"):  # AIS's: tests/test_evaluate_ais_cli.py
            assert f"figures/{name}.png" not in report
            continue
        png = run_2d / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, name  # d = 2: the manifold too
        assert f"![{caption}](figures/{name}.png)" in report
    for words in (
        "log p̂(x), test",
        "active units",
        "MMD²",
        "k̂ > 0.7",
        '"latent_dim": 2',
    ):
        assert words in report


def test_report_rebuilds_from_the_files_alone(run_2d, capsys):
    before = (run_2d / "report.md").read_text()
    (run_2d / "report.md").unlink()
    assert report_main([str(run_2d)]) == 0
    assert (run_2d / "report.md").read_text() == before
    assert str(run_2d / "report.md") in capsys.readouterr().out


def test_report_errors(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 1
    assert "has no config.json" in capsys.readouterr().err
    assert report_main([]) == 2
    (tmp_path / "config.json").write_text("{broken")
    assert report_main([str(tmp_path)]) == 1
    assert "is not valid JSON" in capsys.readouterr().err


def test_no_manifold_for_a_larger_latent(tmp_path):
    out = tmp_path / "r"
    argv = ["--latent-dim", "3", "--epochs", "1", "--hidden", "16", "--eval-k", "0"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    assert not (out / "figures" / "manifold.png").exists()
    assert (out / "figures" / "latent.png").exists()  # PCA of the 3-d codes
    assert "figures/manifold.png" not in (out / "report.md").read_text()


def test_noise_stays_in_the_support():
    gen = torch.Generator().manual_seed(0)
    binary = torch.bernoulli(torch.full((200, 50), 0.3), generator=gen)
    noisy, how = add_noise(binary, gen)
    assert set(noisy.unique().tolist()) <= {0.0, 1.0}
    flipped = (noisy != binary).double().mean().item()
    se = math.sqrt(FLIP_RATE * (1 - FLIP_RATE) / binary.numel())
    assert abs(flipped - FLIP_RATE) < 5 * se and "flipped" in how
    eight_bit = torch.randint(0, 256, (20, 30), generator=gen) / 255
    noisy, _ = add_noise(eight_bit, gen)
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert torch.equal((noisy * 255).round(), noisy * 255)
    assert not torch.equal(noisy, eight_bit)


def test_decode_and_interpolate_are_the_model_at_given_codes():
    model, guide = build_model_and_guide(FitConfig(latent_dim=2, hidden=(8,)), 12)
    z = torch.randn(5, 2)
    expected = torch.sigmoid(model.decoder(z))  # Bernoulli mean at logits
    torch.testing.assert_close(decode(model, z, 12), expected, rtol=0, atol=1e-12)
    x = torch.bernoulli(torch.full((3, 12), 0.5))
    y = torch.bernoulli(torch.full((3, 12), 0.5))
    path = interpolate(model, guide, x, y, steps=4)
    assert path.shape == (3, 4, 12)
    torch.testing.assert_close(path[:, 0], decode(model, encode_mean(guide, x), 12))
    torch.testing.assert_close(path[:, -1], decode(model, encode_mean(guide, y), 12))
