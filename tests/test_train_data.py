"""train() takes the binarization with the data, and a support error says it is one."""

from __future__ import annotations

import pyro
import pytest
import torch

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.data import binarize_splits
from pyro_vae.data.sources import load_dataset
from pyro_vae.errors import DataError
from pyro_vae.training.loop import make_elbo, train


def _parts():
    pyro.set_rng_seed(0)
    return build_model_and_guide(FitConfig(latent_dim=2, hidden=(16,)), 64)


def _splits(binarize):
    raw = load_dataset("digits")
    raw = type(raw)(
        raw.train[:200].double(),
        raw.valid[:50].double(),
        raw.test[:50].double(),
        raw.image_shape,
    )
    return binarize_splits(raw, binarize)


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


SCHEDULE = {"elbo": None, "epochs": 2, "batch_size": 50, "lr": 1e-2}


def test_splits_bring_their_binarization():
    splits = _splits("dynamic")
    assert splits.binarization == "dynamic"
    runs = []
    for form in ("splits", "tensors"):
        model, guide = _parts()
        pyro.set_rng_seed(1)
        schedule = {**SCHEDULE, "elbo": make_elbo("trace")}
        if form == "splits":
            train(model, guide, splits, **schedule)
        else:
            train(
                model,
                guide,
                splits.train,
                splits.valid,
                **schedule,
                dynamic_binarization=True,
            )
        runs.append(_params(model))
    assert torch.equal(*runs)


def test_forgetting_binarization_is_named_as_a_support_error():
    splits = _splits("none")  # grey levels in [0, 1] under a Bernoulli likelihood
    model, guide = _parts()
    with pytest.raises(DataError, match="outside the support.*binariz"):
        train(
            model,
            guide,
            splits.train,
            splits.valid,
            **{**SCHEDULE, "elbo": make_elbo("trace")},
        )
    with pytest.raises(DataError, match="outside the support"):
        train(model, guide, splits, **{**SCHEDULE, "elbo": make_elbo("trace")})


def test_splits_refuse_contradictions():
    splits = _splits("static")
    model, guide = _parts()
    schedule = {**SCHEDULE, "elbo": make_elbo("trace")}
    with pytest.raises(ValueError, match="contradicts the splits"):
        train(model, guide, splits, dynamic_binarization=True, **schedule)
    with pytest.raises(ValueError, match="pass one or the other"):
        train(model, guide, splits, splits.valid, **schedule)
    with pytest.raises(ValueError, match="needs valid_x"):
        train(model, guide, splits.train, **schedule)
    with pytest.raises(DataError, match="already binarized"):
        binarize_splits(splits, "dynamic")
