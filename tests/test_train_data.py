"""train() takes the binarization with the data, and a support error says it is one."""

from __future__ import annotations

import pyro
import pytest
import torch

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.data import Splits, binarize_splits
from pyro_vae.data.sources import load_dataset
from pyro_vae.errors import DataError
from pyro_vae.training.loop import Schedule, make_elbo, train


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


SCHEDULE = Schedule(epochs=2, batch_size=50, lr=1e-2)


def test_splits_bring_their_binarization():
    splits = _splits("dynamic")
    assert splits.binarization == "dynamic"
    runs = []
    for form in ("splits", "tensors"):
        model, guide = _parts()
        pyro.set_rng_seed(1)
        if form == "splits":
            data = splits
        else:
            data = Splits.of(splits.train, splits.valid, binarization="dynamic")
        train(model, guide, data, SCHEDULE, elbo=make_elbo("trace"))
        runs.append(_params(model))
    assert torch.equal(*runs)


def test_forgetting_binarization_is_named_as_a_support_error():
    splits = _splits("none")  # grey levels in [0, 1] under a Bernoulli likelihood
    model, guide = _parts()
    with pytest.raises(DataError, match="outside the support.*binariz"):
        data = Splits.of(splits.train, splits.valid)
        train(model, guide, data, SCHEDULE, elbo=make_elbo("trace"))
    with pytest.raises(DataError, match="outside the support"):
        train(model, guide, splits, SCHEDULE, elbo=make_elbo("trace"))


def test_train_takes_splits_of_a_known_binarization():
    splits = _splits("static")
    model, guide = _parts()
    with pytest.raises(TypeError, match=r"Splits\.of"):
        train(model, guide, splits.train, SCHEDULE, elbo=make_elbo("trace"))
    with pytest.raises(DataError, match="unknown binarization"):
        Splits.of(splits.train, splits.valid, binarization="yes")
    with pytest.raises(DataError, match="already binarized"):
        binarize_splits(splits, "dynamic")
