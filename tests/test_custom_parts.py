"""Parts of one's own: ``--prior PACKAGE.MODULE:FACTORY`` (and likelihood, guide),
through fit, ``--resume``, ``pyro_vae.load`` and ``python -m pyro_vae.evaluate``;
``register_prior`` and friends; the options each factory takes, and refusals that
say what is wrong in one line.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

import pyro_vae
from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.cli.fit import main, parse_args
from pyro_vae.cli.parts import (
    KEYWORDS,
    OPTIONS,
    REGISTRIES,
    register_guide,
    register_likelihood,
    register_prior,
)
from pyro_vae.errors import ConfigError
from pyro_vae.guides import GUIDES, DiagonalNormalGuide
from pyro_vae.models import LIKELIHOODS, PRIORS, GaussianLikelihood
from pyro_vae.training.checkpoint import load_checkpoint

TINY = ["--hidden", "16", "--latent-dim", "2", "--quiet", "--eval-k", "0"]

MYPARTS = '''
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_vae.guides import DiagonalNormalGuide
from pyro_vae.models import GaussianLikelihood

SEEN = {}  # kind -> the keywords the builder passed


class LaplacePrior(PyroModule):
    """p(z) = Laplace(0, s) per coordinate, s learned."""

    def __init__(self, latent_dim):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self):
        return dist.Laplace(self.loc, self.log_scale.exp()).to_event(1)


def laplace_prior(latent_dim, **options):
    SEEN["prior"] = {"latent_dim": latent_dim, **options}
    return LaplacePrior(latent_dim)


def gaussian_likelihood(sigma, **options):
    SEEN["likelihood"] = {"sigma": sigma, **options}
    return GaussianLikelihood(sigma)


class MyGuide(DiagonalNormalGuide):
    pass


def my_guide(make_encoder, latent_dim, **options):
    SEEN["guide"] = {"make_encoder": make_encoder, "latent_dim": latent_dim, **options}
    return MyGuide(make_encoder(2 * latent_dim), latent_dim)


def strict_prior(latent_dim):
    return LaplacePrior(latent_dim)


def needs_more(latent_dim, temperature):
    return LaplacePrior(latent_dim)


def not_a_prior(latent_dim):
    return 3


def not_a_likelihood(data_dim):
    return nn.Linear(data_dim, data_dim)


def not_a_guide(make_encoder, latent_dim):
    return make_encoder(2 * latent_dim)


NOT_CALLABLE = 5
'''


@pytest.fixture
def myparts(tmp_path, monkeypatch):
    """``myparts`` (and a module that fails on import) on sys.path and PYTHONPATH."""
    (tmp_path / "myparts.py").write_text(MYPARTS)
    (tmp_path / "broken_parts.py").write_text("raise RuntimeError('boom\\nsecond')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv(
        "PYTHONPATH", str(tmp_path) + (os.pathsep + path if path else "")
    )
    yield tmp_path
    for name in ("myparts", "broken_parts"):
        sys.modules.pop(name, None)


@pytest.fixture
def registries():
    """Put the registries back as they were after a test that registers names."""
    saved = {kind: dict(registry) for kind, registry in REGISTRIES.items()}
    yield REGISTRIES
    for kind, registry in REGISTRIES.items():
        registry.clear()
        registry.update(saved[kind])


def test_own_prior_through_fit_resume_load_and_evaluate(myparts):
    out = myparts / "run"
    assert (
        main(
            [
                *TINY,
                "--epochs",
                "1",
                "--prior",
                "myparts:laplace_prior",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["prior"] == (
        "myparts:laplace_prior"
    )
    assert load_checkpoint(out / "checkpoint.pt")["config"]["prior"] == (
        "myparts:laplace_prior"
    )
    seen = sys.modules["myparts"].SEEN["prior"]
    assert set(seen) == set(KEYWORDS["prior"])  # every keyword, **options included
    assert seen["latent_dim"] == 2 and seen["data_dim"] == 64
    assert seen["components"] == 10 and callable(seen["posterior"])

    # --resume rebuilds the part from the stored path and carries on training it
    assert main(["--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    payload = load_checkpoint(out / "checkpoint.pt")
    assert payload["epoch"] == 2
    assert "prior.log_scale" in payload["model"]

    # pyro_vae.load rebuilds it with the trained weights
    run = pyro_vae.load(out)
    assert type(run.model.prior).__name__ == "LaplacePrior"
    assert torch.equal(
        run.model.prior.log_scale.detach(), payload["model"]["prior.log_scale"].float()
    )
    assert run.model.prior.log_scale.detach().abs().sum() > 0  # it was trained

    # the evaluate CLI, in a fresh process that has registered nothing
    done = subprocess.run(
        [sys.executable, "-m", "pyro_vae.evaluate", str(out), "--k", "20", "--n", "10"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "log p̂(x)" in done.stdout
    assert json.loads((out / "evaluation.json").read_text())["n"] == 10


def test_own_likelihood_and_guide_get_their_options(myparts):
    out = myparts / "run"
    argv = [
        *TINY,
        "--epochs",
        "1",
        "--likelihood",
        "myparts:gaussian_likelihood",
        "--sigma",
        "0.5",
        "--guide",
        "myparts:my_guide",
        "--rank",
        "3",  # the guide takes **options, so every guide option is its own
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    seen = sys.modules["myparts"].SEEN
    assert set(seen["likelihood"]) == set(KEYWORDS["likelihood"])
    assert seen["likelihood"]["sigma"] == 0.5 and seen["likelihood"]["data_dim"] == 64
    assert set(seen["guide"]) == set(KEYWORDS["guide"])
    assert seen["guide"]["rank"] == 3 and seen["guide"]["hidden"] == (16,)
    run = pyro_vae.load(out)
    assert type(run.guide).__name__ == "MyGuide"
    assert isinstance(run.model.likelihood, GaussianLikelihood)
    assert run.model.likelihood.sigma == 0.5
    assert run.config.likelihood == "myparts:gaussian_likelihood"
    assert run.config.resolved_binarize() == "none"  # not the bernoulli likelihood


def test_factory_without_options_gets_only_what_it_names(myparts):
    cfg = FitConfig(prior="myparts:strict_prior", latent_dim=3)
    model, _ = build_model_and_guide(cfg, 64)
    assert type(model.prior).__name__ == "LaplacePrior"
    # an option given on the command line that it does not take is refused
    with pytest.raises(SystemExit):
        parse_args(["--prior", "myparts:strict_prior", "--df", "5"])


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    error = [line for line in lines if "error:" in line]
    assert len(error) == 1 and error[0] == lines[-1], lines
    return error[0]


@pytest.mark.parametrize(
    "name, words",
    [
        (
            "no_such_module_xyz:f",
            ["'no_such_module_xyz:f'", "cannot import module", "PYTHONPATH"],
        ),
        (
            "broken_parts:f",
            ["cannot import module 'broken_parts'", "RuntimeError: boom"],
        ),
        ("myparts:missing", ["'myparts:missing'", "no attribute 'missing'"]),
        ("myparts:NOT_CALLABLE", ["'myparts:NOT_CALLABLE'", "not a factory"]),
        ("myparts:needs_more", ["'myparts:needs_more'", "temperature", "latent_dim"]),
    ],
)
def test_a_factory_that_cannot_be_had_is_one_line(myparts, capsys, name, words):
    cfg = FitConfig(prior=name)  # a path is not imported to validate a config
    with pytest.raises(ConfigError) as err:
        build_model_and_guide(cfg, 64)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)
    # on the command line, before any data is loaded: exit 2, one line
    line = _one_line_error(["--prior", name, "--out", str(myparts / "x")], capsys)
    assert words[0] in line
    assert not (myparts / "x").exists()


@pytest.mark.parametrize(
    "kind, name, needs",
    [
        ("prior", "myparts:not_a_prior", "forward() returns p(z)"),
        ("likelihood", "myparts:not_a_likelihood", "AbstractLikelihood"),
        ("guide", "myparts:not_a_guide", "posterior(x)"),
    ],
)
def test_a_factory_returning_the_wrong_kind_is_refused(myparts, kind, name, needs):
    with pytest.raises(ConfigError) as err:
        build_model_and_guide(FitConfig(**{kind: name}), 64)
    message = str(err.value)
    assert "\n" not in message
    assert f"the {kind} factory {name!r} returned a" in message and needs in message


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--components", "5"],
            "--components is an option of the mog prior; the normal prior takes: "
            "latent_dim",
        ),
        (
            ["--prior", "vamp", "--df", "4"],
            "--df is an option of the student-t prior; the vamp prior takes: "
            "posterior, data_dim, pseudo_inputs",
        ),
        (
            ["--sigma", "0.5"],
            "the bernoulli likelihood takes: no options",
        ),
        (
            ["--likelihood", "beta", "--sigma", "0.5"],
            "the beta likelihood takes: sigma_floor",
        ),
        (
            ["--rank", "3", "--guide", "flow"],
            "--rank is an option of the lowrank guide; the flow guide takes: "
            "make_encoder, latent_dim, flow_steps",
        ),
    ],
)
def test_an_option_the_part_does_not_take_is_refused(argv, message, capsys):
    line = _one_line_error([*argv, "--quiet"], capsys)
    assert message in line


def test_options_the_part_takes_and_defaults_pass():
    assert parse_args([]) == FitConfig()
    assert parse_args(["--prior", "mog", "--components", "5"]).components == 5
    assert parse_args(["--likelihood", "gaussian", "--sigma", "0.5"]).sigma == 0.5
    assert parse_args(["--guide", "lowrank", "--rank", "1"]).rank == 1
    # a FitConfig in Python is a full table of values: not refused for them
    cfg = FitConfig(prior="normal", components=3, pseudo_inputs=5)
    model, _ = build_model_and_guide(cfg, 64)
    assert type(model.prior).__name__ == "StandardNormalPrior"


def test_registry_factories_name_their_options():
    expected = {
        "prior": {
            "normal": ["latent_dim"],
            "learned-normal": ["latent_dim"],
            "mog": ["latent_dim", "components"],
            "vamp": ["posterior", "data_dim", "pseudo_inputs"],
            "student-t": ["latent_dim", "df"],
        },
        "likelihood": {
            "bernoulli": [],
            "gaussian": ["sigma"],
            "gaussian-learned": ["sigma", "sigma_floor"],
            "gaussian-pixel": ["data_dim", "sigma", "sigma_floor"],
            "beta": ["sigma_floor"],
        },
        "guide": {
            "diagonal": ["make_encoder", "latent_dim"],
            "lowrank": ["make_encoder", "latent_dim", "rank"],
            "flow": ["make_encoder", "latent_dim", "flow_steps"],
        },
    }
    for kind, names in expected.items():
        for name, params in names.items():
            signature = inspect.signature(REGISTRIES[kind][name])
            assert list(signature.parameters) == params, (kind, name)
        for name, factory in REGISTRIES[kind].items():
            params = inspect.signature(factory).parameters.values()
            assert all(p.kind is not p.VAR_KEYWORD for p in params), (kind, name)
            assert {p.name for p in params} <= set(KEYWORDS[kind]), (kind, name)
        assert set(OPTIONS[kind]) <= set(KEYWORDS[kind])


def test_registry_factory_refuses_a_keyword_it_does_not_know():
    with pytest.raises(
        TypeError,
        match="the mog prior does not take compnents; it takes: latent_dim, components",
    ):
        PRIORS["mog"](latent_dim=3, compnents=5)
    with pytest.raises(
        TypeError,
        match="the bernoulli likelihood does not take "
        "temperature; it takes: no options",
    ):
        LIKELIHOODS["bernoulli"](temperature=2.0)
    with pytest.raises(TypeError, match="the diagonal guide does not take unused"):
        GUIDES["diagonal"](lambda k: torch.nn.Linear(4, k), 2, unused=1)
    # the other keywords of its kind, which the builder offers every factory, pass
    assert PRIORS["mog"](latent_dim=3, df=4.0, data_dim=8).logits.shape == (10,)


def test_unknown_plain_names_list_the_registry():
    with pytest.raises(
        ConfigError,
        match="unknown prior 'laplace'; choose one of: "
        "learned-normal, mog, normal, student-t, vamp, or give",
    ):
        FitConfig(prior="laplace")
    with pytest.raises(ConfigError, match="not an import path"):
        FitConfig(guide="my.guides:")


def test_register_prior_likelihood_and_guide(myparts, registries):
    mine = importlib.import_module("myparts")
    register_prior("laplace-mine", mine.laplace_prior)
    register_likelihood("gauss-mine", mine.gaussian_likelihood)

    @register_guide("guide-mine")
    def guide_mine(make_encoder, latent_dim):
        return DiagonalNormalGuide(make_encoder(2 * latent_dim), latent_dim)

    cfg = FitConfig(
        prior="laplace-mine", likelihood="gauss-mine", guide="guide-mine", sigma=0.3
    )
    model, guide = build_model_and_guide(cfg, 64)
    assert type(model.prior).__name__ == "LaplacePrior"
    assert model.likelihood.sigma == 0.3
    assert isinstance(guide, DiagonalNormalGuide)
    assert parse_args(["--prior", "laplace-mine", "--df", "2"]).df == 2  # **options

    with pytest.raises(ValueError, match="registered already"):
        register_prior("normal", mine.laplace_prior)
    with pytest.raises(ValueError, match="no ':'"):
        register_prior("my:prior", mine.laplace_prior)
    register_prior("normal", mine.laplace_prior, replace=True)
    assert PRIORS["normal"] is mine.laplace_prior
