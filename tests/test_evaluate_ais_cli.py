"""``python -m pyro_vae.evaluate --method ais|both --bdmc N`` and ``fit --eval-method``
in-process, on a tiny trained run, with tiny AIS settings: the files, the loud check,
and the refusals."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_vae.cli.evaluate as evaluate_cli
import pyro_vae.cli.evaluation_sharded as evaluation_sharded
from pyro_vae.cli.config import FitConfig
from pyro_vae.cli.evaluate import main as eval_main
from pyro_vae.cli.fit import main as fit_main
from pyro_vae.cli.report import main as report_main
from pyro_vae.evaluate.bdmc import BDMCResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N = 4
AIS = ["--ais-steps", "3", "--chains", "2", "--leapfrog", "2", "--n", str(N)]
FAST = [*AIS, "--k", "50"]
BDMC = ["--bdmc", "3", "--bdmc-steps", "2,4"]
AIS_FIGURES = ("is_vs_ais", "bdmc")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One epoch on digits; the evaluation is left to the tests (--eval-k 0)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    argv = ["--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--quiet"]
    assert fit_main([*argv, "--eval-k", "0", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_dir(trained_run, tmp_path):
    """A private copy of the run, so that each test's evaluation files are its own."""
    return shutil.copytree(trained_run, tmp_path / "run")


def read_json(path) -> dict:
    return json.loads(path.read_text())


def read_netcdf(run_dir) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz as az

        evaluation = az.from_netcdf(str(run_dir / "evaluation.nc"))["evaluation"]
        return {name: evaluation[name].values for name in evaluation.data_vars}


def finite(entry: dict) -> bool:
    return math.isfinite(entry["mean"]) and math.isfinite(entry["se"])


def test_both_with_bdmc_writes_every_file(run_dir, capsys):
    assert eval_main([str(run_dir), *FAST, "--method", "both", *BDMC]) == 0
    printed = capsys.readouterr().out
    for words in ("log p̂(x)", "log p̂_AIS(x)", "IS − AIS", "BDMC on 3 data"):
        assert words in printed, words

    summary = read_json(run_dir / "evaluation.json")
    assert summary["n"] == N and summary["k"] == 50 and finite(summary["log_px"])
    ais = summary["ais"]
    assert (ais["steps"], ais["chains"], ais["leapfrog"], ais["n"]) == (3, 2, 2, N)
    assert finite(ais["log_px"]) and ais["log_px"]["se"] > 0
    assert 0 <= ais["acceptance"]["min"] <= ais["acceptance"]["mean"] <= 1
    assert ais["seconds"] > 0 and "annealed importance sampling" in ais["estimator"]
    d = summary["is_minus_ais"]
    assert d["mean"] == pytest.approx(
        summary["log_px"]["mean"] - ais["log_px"]["mean"], abs=1e-9
    )
    # independent draws: the mean's se is that of IS and AIS added in quadrature
    assert d["se"] == pytest.approx(
        math.hypot(summary["log_px"]["se"], ais["log_px"]["se"]), rel=1e-9
    )
    above, below = d["khat_above_0.7"], d["khat_at_most_0.7"]
    assert above["n"] + below["n"] == N
    assert d["fraction_khat_above_0.7"] == pytest.approx(above["n"] / N)
    corr = d["correlation_with_khat"]
    assert corr is None or -1 <= corr <= 1
    sandwich = summary["bdmc"]
    assert [row["steps"] for row in sandwich["rows"]] == [2, 4]
    assert sandwich["n"] == 3 and isinstance(sandwich["gap_shrinks_with_steps"], bool)
    for row in sandwich["rows"]:
        assert all(finite(row[key]) for key in ("lower", "upper", "gap"))
    assert isinstance(summary["ais_warnings"], list)

    per_datum = read_netcdf(run_dir)
    for name in ("log_px", "khat", "log_px_ais", "log_px_ais_se", "acceptance_ais"):
        assert per_datum[name].shape == (N,), name
    assert per_datum["log_px_ais"].mean() == pytest.approx(ais["log_px"]["mean"])
    for name in ("iwae_vs_k", "khat", *AIS_FIGURES):
        assert (run_dir / "figures" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC

    assert report_main([str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    for words in (
        "log p̂(x), test",
        "log p̂_AIS(x), test",
        "| IS − AIS |",
        "| BDMC, 2 steps |",
        "| BDMC, 4 steps |",
        "figures/is_vs_ais.png",
        "figures/bdmc.png",
    ):
        assert words in report, words


def test_method_is_is_unchanged_and_clears_an_older_ais(run_dir, capsys):
    assert eval_main([str(run_dir), *FAST]) == 0
    default = read_json(run_dir / "evaluation.json")
    default_printed = capsys.readouterr().out
    assert eval_main([str(run_dir), *FAST, "--method", "both", *BDMC]) == 0
    capsys.readouterr()
    assert eval_main([str(run_dir), *FAST, "--method", "is"]) == 0
    printed = capsys.readouterr().out
    summary = read_json(run_dir / "evaluation.json")
    assert list(summary) == list(default)  # the same keys in the same order
    assert not {"ais", "is_minus_ais", "bdmc", "ais_warnings"} & set(summary)
    strip = {"seconds", "chunks"}
    assert {k: v for k, v in summary.items() if k not in strip} == {
        k: v for k, v in default.items() if k not in strip
    }
    assert "AIS" not in printed and "WARNING" not in printed
    assert printed.splitlines()[1:] == default_printed.splitlines()[1:]  # not timing
    assert "log_px_ais" not in read_netcdf(run_dir)
    for name in AIS_FIGURES:  # the older evaluation's figures are gone
        assert not (run_dir / "figures" / f"{name}.png").exists(), name


def test_ais_alone(run_dir, capsys):
    assert eval_main([str(run_dir), *AIS, "--method", "ais"]) == 0
    printed = capsys.readouterr().out
    assert "AIS" in printed and "log p̂_AIS(x)" in printed and "IWAE" not in printed
    summary = read_json(run_dir / "evaluation.json")
    assert summary["n"] == N and finite(summary["ais"]["log_px"])
    assert not {"log_px", "elbo", "khat", "is_minus_ais", "bdmc"} & set(summary)
    assert summary["ais_warnings"] == [] and summary["latents"]["n"] == N
    per_datum = read_netcdf(run_dir)
    assert set(per_datum) == {"log_px_ais", "log_px_ais_se", "acceptance_ais"}
    for name in ("iwae_vs_k", "khat", *AIS_FIGURES):
        assert not (run_dir / "figures" / f"{name}.png").exists(), name
    assert report_main([str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    assert "log p̂_AIS(x), test" in report and "log p̂(x), test" not in report


def _fails(argv, capsys, status) -> str:
    assert eval_main(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "args, phrases",
    [
        (["--ais-steps", "0"], ["argument --ais-steps", "must be a positive integer"]),
        (["--ais-steps", "1"], ["argument --ais-steps", "at least 2", "--method is"]),
        (["--chains", "-2"], ["argument --chains", "must be a positive integer"]),
        (["--leapfrog", "0"], ["argument --leapfrog", "must be a positive integer"]),
        (["--leapfrog", "two"], ["argument --leapfrog", "'two'"]),
        (["--method", "mcmc"], ["argument --method", "invalid choice: 'mcmc'"]),
        (["--bdmc", "1"], ["argument --bdmc", "0 (skip) or a number of data >= 2"]),
        (["--bdmc-steps", "1,10"], ["argument --bdmc-steps", "must be >= 2"]),
        (["--bdmc-steps", "10,x"], ["argument --bdmc-steps", "comma list"]),
    ],
    ids=[
        "steps0",
        "steps1",
        "chains-2",
        "leapfrog0",
        "leapfrog-text",
        "method",
        "bdmc1",
        "bdmc-steps1",
        "bdmc-steps-text",
    ],
)
def test_bad_arguments_exit_2(trained_run, capsys, args, phrases):
    err = _fails([str(trained_run), *args], capsys, 2)
    for phrase in phrases:
        assert phrase in err, err
    assert not (trained_run / "evaluation.json").exists()


def _shift_ais(monkeypatch, nats: float) -> None:
    """AIS's log p̂(x) moved by ``nats`` per datum, as a bug or a bad chain would."""
    real = evaluation_sharded.run_ais

    def shifted(*args, **kwargs):
        result = real(*args, **kwargs)
        return dataclasses.replace(result, log_px=result.log_px + nats)

    # fit's final evaluation and evaluate both estimate through evaluation_sharded
    monkeypatch.setattr(evaluation_sharded, "run_ais", shifted)


def test_the_loud_check_fires(run_dir, capsys, monkeypatch):
    _shift_ais(monkeypatch, -100.0)  # IS far above AIS
    monkeypatch.setattr(BDMCResult, "shrinks", lambda self: False)
    assert eval_main([str(run_dir), *FAST, "--method", "both", *BDMC]) == 0
    printed = capsys.readouterr().out
    is_above = "WARNING: importance sampling's mean log p̂(x) is above AIS's by 100"
    no_shrink = "WARNING: the BDMC gap does not shrink as the steps grow"
    assert is_above in printed and no_shrink in printed
    summary = read_json(run_dir / "evaluation.json")
    assert summary["bdmc"]["gap_shrinks_with_steps"] is False
    found = summary["ais_warnings"]
    assert len(found) == 2
    assert "badly tuned or wrong" in found[0] and "--ais-steps" in found[0]
    assert "gap does not shrink" in found[1] and "--leapfrog" in found[1]
    assert report_main([str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    assert "## Warnings" in report and report.count("**WARNING:**") == 2


def test_the_loud_check_is_quiet_when_ais_is_tighter(run_dir, capsys, monkeypatch):
    _shift_ais(monkeypatch, +100.0)  # AIS far above IS: as it should be
    monkeypatch.setattr(BDMCResult, "shrinks", lambda self: True)
    assert eval_main([str(run_dir), *FAST, "--method", "both", *BDMC]) == 0
    assert "WARNING" not in capsys.readouterr().out
    assert read_json(run_dir / "evaluation.json")["ais_warnings"] == []


class DiscreteModel(nn.Module):
    """p(z) p(x | z) with binary z: a latent HMC cannot move."""

    def __init__(self, latent_dim: int, data_dim: int) -> None:
        super().__init__()
        self.decoder = nn.Linear(latent_dim, data_dim).float()
        self.latent_dim = latent_dim

    def forward(self, x=None, n=None):
        with pyro.plate("data", len(x) if x is not None else n):
            probs = torch.full((self.latent_dim,), 0.5, dtype=torch.float32)
            z = pyro.sample("z", dist.Bernoulli(probs).to_event(1))
            logits = self.decoder(z)
            return pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


class DiscreteGuide(nn.Module):
    def __init__(self, latent_dim: int, data_dim: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(data_dim, latent_dim).float()

    def forward(self, x=None, n=None):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(logits=self.encoder(x)).to_event(1))


def test_ais_on_a_discrete_latent_is_one_line(run_dir, capsys, monkeypatch):
    real = evaluate_cli.load

    def discrete(run_dir, device):
        run = real(run_dir, device)
        d, D = run.config.latent_dim, run.data_dim
        return dataclasses.replace(
            run, model=DiscreteModel(d, D), guide=DiscreteGuide(d, D)
        )

    monkeypatch.setattr(evaluate_cli, "load", discrete)
    err = _fails([str(run_dir), *FAST, "--method", "ais"], capsys, 1)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "latent site 'z' is discrete" in err and "--method is" in err
    assert not (run_dir / "evaluation.json").exists()


def test_fit_eval_method_both_then_resume_with_ais(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--eval-k", "20"]
    ais = ["--eval-ais-steps", "3", "--eval-chains", "2", "--eval-leapfrog", "2"]
    assert fit_main([*argv, *ais, "--eval-method", "both", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "IS and AIS evaluation" in printed and "log p̂_AIS(x)" in printed
    summary = read_json(out / "evaluation.json")
    assert summary["ais"]["steps"] == 3 and summary["ais"]["n"] == summary["n"]
    assert finite(summary["ais"]["log_px"]) and "is_minus_ais" in summary
    metrics = read_json(out / "metrics.json")
    assert math.isfinite(metrics["test_log_px_ais"]) and "test_log_px" in metrics
    assert "test_is_minus_ais" in metrics
    assert (out / "figures" / "is_vs_ais.png").read_bytes()[:8] == PNG_MAGIC
    assert "log p̂_AIS(x), test" in (out / "report.md").read_text()

    # --resume may change the method: AIS alone, the IS files go
    resume = ["--resume", str(out), "--epochs", "2", "--quiet"]
    assert fit_main([*resume, "--eval-method", "ais", "--eval-ais-steps", "4"]) == 0
    summary = read_json(out / "evaluation.json")
    assert summary["ais"]["steps"] == 4 and "log_px" not in summary
    metrics = read_json(out / "metrics.json")
    assert "test_log_px" not in metrics and math.isfinite(metrics["test_log_px_ais"])
    assert not (out / "figures" / "iwae_vs_k.png").exists()
    assert (out / "figures" / "elbo.png").exists()
    assert read_json(out / "config.json")["eval_method"] == "ais"


def test_old_config_without_the_eval_method_loads():
    values = dataclasses.asdict(FitConfig())
    for name in ("eval_method", "eval_ais_steps", "eval_chains", "eval_leapfrog"):
        del values[name]
    cfg = FitConfig.from_dict(values)
    assert (cfg.eval_method, cfg.eval_ais_steps, cfg.eval_chains) == ("is", 1000, 16)


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--eval-method", "mcmc"], "--eval-method must be one of is, ais, both"),
        (["--eval-ais-steps", "1"], "--eval-ais-steps must be >= 2"),
        (
            ["--eval-chains", "0"],
            "--eval-chains must be >= 2 (one chain gives no se), got 0",
        ),
    ],
)
def test_fit_refuses_bad_eval_settings(tmp_path, capsys, args, phrase):
    assert fit_main([*args, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err


def test_the_loud_check_names_non_finite_and_crossing_results():
    from pyro_vae.cli.evaluation_ais import ais_warnings, json_safe

    nan = float("nan")
    ais = {"log_px": {"mean": -90.0, "se": nan}, "steps": 10,
           "acceptance": {"mean": 0.6, "min": 0.1}}  # fmt: skip
    summary = json_safe({"ais": ais, "is_minus_ais": {"mean": 1.0, "se": nan}})
    (warning,) = ais_warnings(summary)
    assert "non-finite" in warning
    row = {"steps": 10, "gap": {"mean": -2.0, "se": 0.1}}
    sandwich = {"rows": [row], "gap_shrinks_with_steps": True,
                "bounds_cross_at_steps": [10]}  # fmt: skip
    (warning,) = ais_warnings({"bdmc": sandwich})
    assert "upper bound lies below the lower bound" in warning
