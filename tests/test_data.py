"""Data checks, splits, binarization and dataset loading (pyro_vae.data, .sources).

Every error test checks that the message names the problem and the fix. MNIST-family
tests write tiny IDX files themselves and never touch the network.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pyro_vae.cli.fit import main
from pyro_vae.data import (
    SPLIT_SEED,
    Splits,
    batches,
    binarize_splits,
    check_images,
    split_train_valid,
)
from pyro_vae.data.sources import DATASETS, IDX_FILES, load_dataset
from pyro_vae.errors import DataError
from pyro_vae.models import BernoulliLikelihood

# --------------------------------------------------------------------------- helpers


def _idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    """Big-endian IDX: 0x0000, type code, ndim, then one uint32 per dimension."""
    header = struct.pack(">HBB", 0, type_code, arr.ndim)
    header += b"".join(struct.pack(">I", d) for d in arr.shape)
    dtype = {0x08: ">u1", 0x0B: ">i2"}[type_code]
    return header + arr.astype(dtype).tobytes()


def _mnist_arrays() -> dict[str, np.ndarray]:
    """30 train and 10 test 28x28 images; pixel (0, 0) of image i is 5 * i."""
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    x_test = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    x_train[:, 0, 0] = np.arange(30) * 5
    x_test[:, 0, 0] = np.arange(10) * 5
    return {
        "train-images-idx3-ubyte": x_train,
        "train-labels-idx1-ubyte": (np.arange(30) * 7 % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": x_test,
        "t10k-labels-idx1-ubyte": (np.arange(10) * 3 % 10).astype(np.uint8),
    }


def _write_idx(folder: Path, arrays: dict[str, np.ndarray], *, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        data = _idx_bytes(arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def _snapshot(folder: Path) -> list[tuple[str, int, bytes]]:
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_mtime_ns, p.read_bytes())
        for p in folder.rglob("*")
        if p.is_file()
    ) + sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_dir())


def _require_files(folder: Path, names: list[str]) -> None:
    """Skip when data files are absent, but fail under CI, where they must exist."""
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        reason = f"missing {missing} in {folder} (apt install dataset-fashion-mnist)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty XDG cache, so unpacked IDX files land in tmp_path/cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(path))
    return path


# ------------------------------------------------------------------- check_images


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_images_rejects_non_finite(bad):
    x = np.full((4, 3), 0.5)
    x[2, 1] = bad
    with pytest.raises(DataError, match=r"x_train has 1 NaN or infinite values") as e:
        check_images(x, "x_train")
    assert "first in datum 2" in str(e.value)
    assert "remove those data or impute the values" in str(e.value)


def test_check_images_floats_up_to_255_hint_divide_by_255():
    x = np.array([[0.0, 17.0], [255.0, 3.5]])
    with pytest.raises(DataError, match=r"values in \[0, 255\], outside \[0, 1\]") as e:
        check_images(x, "x")
    assert "divide by 255" in str(e.value)
    assert "Scale the data to [0, 1]" in str(e.value)


def test_check_images_floats_above_255_no_255_hint():
    x = np.array([[0.0, 1000.0]])
    with pytest.raises(DataError, match=r"values in \[0, 1000\], outside") as e:
        check_images(x, "x")
    assert "divide by 255" not in str(e.value)
    assert "Scale the data to [0, 1]" in str(e.value)


def test_check_images_negative_floats_rejected_without_255_hint():
    # Standardized data (mean 0, values in [-2, 0.8]) are not 8-bit data.
    x = np.array([[-2.0, 0.8], [0.1, 0.3]])
    with pytest.raises(
        DataError, match=r"values in \[-2, 0.8\], outside \[0, 1\]"
    ) as e:
        check_images(x, "x")
    assert "Scale the data to [0, 1]" in str(e.value)
    assert "divide by 255" not in str(e.value), str(e.value)


@pytest.mark.parametrize(("values", "lo", "hi"), [([0, 300], 0, 300), ([-1, 5], -1, 5)])
def test_check_images_rejects_integers_outside_0_255(values, lo, hi):
    x = np.array([values], dtype=np.int64)
    with pytest.raises(DataError, match=rf"holds integers in \[{lo}, {hi}\]") as e:
        check_images(x, "x")
    assert "expected 8-bit intensities in [0, 255] or 0/1 values" in str(e.value)
    assert "Rescale to floats in [0, 1]" in str(e.value)


@pytest.mark.parametrize("shape", [(5,), (2, 1, 3, 4, 5)])
def test_check_images_rejects_wrong_rank(shape):
    with pytest.raises(
        DataError, match=re.escape(f"x has shape {shape}; expected (N, D)")
    ) as e:
        check_images(np.zeros(shape), "x")
    assert "x.reshape(len(x), -1)" in str(e.value)


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0, 28, 28)])
def test_check_images_rejects_empty(shape):
    with pytest.raises(
        DataError, match=re.escape(f"x is empty (shape {shape}); it needs data")
    ):
        check_images(np.zeros(shape), "x")


@pytest.mark.parametrize(
    "x",
    [
        np.array([["a", "b"], ["c", "d"]]),
        np.array([[0.5, "b"], [0.1, 0.2]], dtype=object),
        np.array([[0.5, 0.2], [0.1, 0.3]], dtype=object),
    ],
    ids=["str", "mixed-object", "float-object"],
)
def test_check_images_rejects_non_numeric_dtype_with_data_error(x):
    # Must be a DataError naming the dtype and the fix, not torch's bare TypeError.
    with pytest.raises(DataError, match=r"x has dtype .*give an array of numbers"):
        check_images(x, "x")


def test_check_images_rejects_complex():
    x = np.zeros((2, 2), dtype=np.complex64)
    with pytest.raises(
        DataError, match=r"x has dtype complex64; give an array of numbers"
    ):
        check_images(x, "x")


def test_check_images_uint8_divided_by_255_exactly():
    x = np.arange(256, dtype=np.uint8).reshape(2, 128)
    out, shape = check_images(x, "x")
    expected = torch.arange(256, dtype=torch.float32).reshape(2, 128) / 255.0
    assert out.dtype == torch.float32
    assert shape == (128,)
    assert torch.equal(out, expected)
    assert out[1, 127].item() == 1.0


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.int8])
def test_check_images_zero_one_integers_stay(dtype):
    x = np.array([[0, 1, 1], [1, 0, 0]], dtype=dtype)
    out, shape = check_images(x, "x")
    assert out.dtype == torch.float32
    assert shape == (3,)
    assert out.tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


def test_check_images_bool():
    x = np.array([[True, False], [False, True]])
    out, shape = check_images(x, "x")
    assert out.dtype == torch.float32
    assert shape == (2,)
    assert out.tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_check_images_integers_up_to_255_divided():
    # Integers above 1 (here int64 up to 200) follow the 8-bit rule too.
    out, _ = check_images(np.array([[0, 2, 200]], dtype=np.int64), "x")
    assert torch.equal(out, torch.tensor([[0.0, 2.0, 200.0]]).float() / 255.0)


@pytest.mark.parametrize(
    ("shape", "image_shape", "dim"),
    [((3, 4, 5), (4, 5), 20), ((2, 3, 4, 5), (3, 4, 5), 60), ((6, 7), (7,), 7)],
)
def test_check_images_flattens_and_returns_image_shape(shape, image_shape, dim):
    n = shape[0]
    x = np.arange(math.prod(shape), dtype=np.float64).reshape(shape)
    x = x / x.max()
    out, got_shape = check_images(x, "x")
    assert got_shape == image_shape
    assert out.shape == (n, dim)
    assert out.dtype == torch.float32
    # Row-major flattening: datum i is x[i].ravel().
    assert torch.equal(out, torch.from_numpy(x.reshape(n, -1)).float())


def test_check_images_accepts_tensors_and_float32_output():
    x = torch.tensor([[0.25, 0.5], [0.75, 1.0]], dtype=torch.float64)
    out, shape = check_images(x, "x")
    assert out.dtype == torch.float32
    assert shape == (2,)
    assert out.tolist() == [[0.25, 0.5], [0.75, 1.0]]


# ------------------------------------------------ Bernoulli support (library + CLI)


def test_bernoulli_check_data_rejects_grey_levels():
    x = torch.tensor([[0.0, 1.0, 0.5], [0.2, 1.0, 0.0]])
    with pytest.raises(ValueError, match=r"2 of 6 values are neither 0 nor 1") as e:
        BernoulliLikelihood().check_data(x)
    assert "--binarize" in str(e.value)
    assert "--likelihood gaussian" in str(e.value)
    # Binary data pass.
    BernoulliLikelihood().check_data(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))


def test_cli_bernoulli_without_binarization_fails_cleanly(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["--dataset", "digits", "--binarize", "none", "--epochs", "1"]
    code = main([*argv, "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.startswith("error: the Bernoulli likelihood needs binary data")
    assert "--binarize" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert not out.exists()  # rejected before the run directory is created


# -------------------------------------------------------------- split_train_valid


def test_split_train_valid_disjoint_covering_and_aligned():
    x = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    labels = torch.arange(20)
    train, valid, y_train, y_valid = split_train_valid(x, labels, 0.25)
    assert (len(train), len(valid)) == (15, 5)
    rows = torch.cat([train[:, 0], valid[:, 0]]) / 2
    assert sorted(rows.long().tolist()) == list(range(20))
    assert set(train[:, 0].tolist()).isdisjoint(valid[:, 0].tolist())
    # Labels follow their rows.
    assert torch.equal(y_train, (train[:, 0] / 2).long())
    assert torch.equal(y_valid, (valid[:, 0] / 2).long())


def test_split_train_valid_without_labels():
    x = torch.arange(10, dtype=torch.float32).reshape(10, 1)
    train, valid, y_train, y_valid = split_train_valid(x, None, 0.3)
    assert (len(train), len(valid), y_train, y_valid) == (7, 3, None, None)


def test_split_train_valid_deterministic_and_ignores_global_seed():
    x = torch.arange(50, dtype=torch.float32).reshape(50, 1)
    torch.manual_seed(1)
    a = split_train_valid(x, None, 0.2)
    torch.manual_seed(12345)
    b = split_train_valid(x, None, 0.2)
    torch.manual_seed(1)
    torch.rand(100)  # advance the global generator
    c = split_train_valid(x, None, 0.2)
    for first, other in ((a, b), (a, c)):
        assert torch.equal(first[0], other[0])
        assert torch.equal(first[1], other[1])
    # The split is the permutation of SPLIT_SEED: valid = first 10 indices.
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(SPLIT_SEED))
    assert a[1][:, 0].long().tolist() == perm[:10].tolist()
    assert a[0][:, 0].long().tolist() == perm[10:].tolist()
    assert a[1][:, 0].long().tolist() != list(range(10))  # actually shuffled


@pytest.mark.parametrize("fraction", [0, 0.0, 1, 1.0, -0.1, 1.5])
def test_split_train_valid_rejects_fraction_outside_open_interval(fraction):
    x = torch.zeros(10, 2)
    with pytest.raises(
        DataError,
        match=rf"--valid-fraction must lie strictly between 0 and 1, got {fraction}",
    ):
        split_train_valid(x, None, fraction)


@pytest.mark.parametrize(("n", "fraction", "n_valid"), [(2, 0.9, 2), (10, 0.99, 10)])
def test_split_train_valid_rejects_no_training_left(n, fraction, n_valid):
    x = torch.zeros(n, 2)
    with pytest.raises(
        DataError,
        match=rf"only {n} training data: too few to carve a validation set of "
        rf"{n_valid}; lower --valid-fraction or give more data",
    ):
        split_train_valid(x, None, fraction)


# ------------------------------------------------------ binarize_splits / batches


def _grey_splits() -> Splits:
    g = torch.Generator().manual_seed(3)
    train, valid, test = (torch.rand(n, 12, generator=g) for n in (40, 20, 20))
    for t in (train, valid, test):  # exact 0 and 1 columns must stay 0 and 1
        t[:, 0] = 0.0
        t[:, 1] = 1.0
    return Splits(train, valid, test, (3, 4))


def _is_binary(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


def test_binarize_static_binary_fixed_seed():
    splits = _grey_splits()
    torch.manual_seed(1)
    a = binarize_splits(splits, "static")
    torch.manual_seed(99)
    b = binarize_splits(splits, "static")
    for name in ("train", "valid", "test"):
        x, y = getattr(a, name), getattr(b, name)
        assert _is_binary(x), name
        assert torch.equal(x, y), name
        assert torch.all(x[:, 0] == 0) and torch.all(x[:, 1] == 1), name
        assert x.shape == getattr(splits, name).shape
        # Not a constant: it draws from the grey levels (40*10 or 20*10 draws).
        assert 0 < x[:, 2:].mean().item() < 1
    assert a.image_shape == (3, 4)
    assert torch.equal(splits.train, _grey_splits().train)  # input untouched


def test_binarize_dynamic_keeps_train_grey_binarizes_eval():
    splits = _grey_splits()
    torch.manual_seed(5)
    a = binarize_splits(splits, "dynamic")
    torch.manual_seed(6)
    b = binarize_splits(splits, "dynamic")
    assert torch.equal(a.train, splits.train)
    assert not _is_binary(a.train)
    for name in ("valid", "test"):
        assert _is_binary(getattr(a, name)), name
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_binarize_none_returns_data_unchanged():
    splits = _grey_splits()
    out = binarize_splits(splits, "none")
    assert out is splits
    assert torch.equal(out.train, _grey_splits().train)


def test_binarize_unknown_name():
    with pytest.raises(
        DataError,
        match=r"unknown binarization 'stochastic'; choose from "
        r"\('dynamic', 'static', 'none'\)",
    ):
        binarize_splits(_grey_splits(), "stochastic")


def test_batches_dynamic_draws_match_grey_levels():
    p = torch.tensor([[0.0, 0.1, 0.25, 0.5, 0.9, 1.0]])
    draws = 2000
    total = torch.zeros_like(p)
    for _ in range(draws):
        (batch,) = list(batches(p, 1, shuffle=False, dynamic=True))
        assert batch.shape == (1, 6)
        assert _is_binary(batch)
        total += batch
    mean = total / draws
    assert mean[0, 0].item() == 0.0 and mean[0, -1].item() == 1.0
    se = torch.sqrt(p * (1 - p) / draws)
    inner = slice(1, 5)
    assert torch.all((mean[:, inner] - p[:, inner]).abs() < 5 * se[:, inner]), (
        mean,
        p,
    )


def test_batches_shuffle_covers_every_row_once_per_pass():
    x = torch.arange(23, dtype=torch.float32).reshape(23, 1)
    orders = []
    for _ in range(2):
        got = list(batches(x, 5, shuffle=True))
        assert [len(b) for b in got] == [5, 5, 5, 5, 3]
        rows = torch.cat(got)[:, 0].long().tolist()
        assert sorted(rows) == list(range(23))
        orders.append(rows)
    assert orders[0] != list(range(23)) or orders[1] != list(range(23))


def test_batches_without_shuffle_in_order():
    x = torch.arange(7, dtype=torch.float32).reshape(7, 1)
    got = [b[:, 0].tolist() for b in batches(x, 3, shuffle=False)]
    assert got == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0]]


# ------------------------------------------------------------- load_dataset: digits


def test_load_digits_shapes_and_values():
    from sklearn.datasets import load_digits

    s = load_dataset("digits")
    assert (len(s.train), len(s.valid), len(s.test)) == (1293, 144, 360)
    assert len(s.train) + len(s.valid) + len(s.test) == 1797
    assert s.data_dim == 64
    assert s.image_shape == (8, 8)
    for t in (s.train, s.valid, s.test):
        assert t.dtype == torch.float32
    everything = torch.cat([s.train, s.valid, s.test])
    assert everything.min().item() == 0.0 and everything.max().item() == 1.0
    # Grey levels 0..16 divided by 16, nothing else.
    assert torch.equal(everything * 16, torch.round(everything * 16))
    labels = torch.cat([s.train_labels, s.valid_labels, s.test_labels])
    expected = np.bincount(load_digits().target, minlength=10).tolist()
    assert torch.bincount(labels, minlength=10).tolist() == expected


# ---------------------------------------------------------------- load_dataset: npz


def _npz_arrays() -> dict[str, np.ndarray]:
    x_train = np.repeat(np.arange(20, dtype=np.uint8) * 10, 16).reshape(20, 4, 4)
    x_test = np.repeat(np.arange(5, dtype=np.uint8) * 50, 16).reshape(5, 4, 4)
    return {
        "x_train": x_train,
        "y_train": np.arange(20),
        "x_test": x_test,
        "y_test": np.arange(5) + 100,
    }


def test_load_npz_with_labels(tmp_path):
    path = tmp_path / "d.npz"
    arrays = _npz_arrays()
    np.savez(path, **arrays)
    s = load_dataset("npz", data_path=path, valid_fraction=0.25)
    assert (len(s.train), len(s.valid), len(s.test)) == (15, 5, 5)
    assert s.image_shape == (4, 4)
    assert s.data_dim == 16
    expected_test = torch.from_numpy(arrays["x_test"].reshape(5, 16)).float() / 255.0
    assert torch.equal(s.test, expected_test)
    assert s.test_labels.tolist() == [100, 101, 102, 103, 104]
    # Labels follow their rows through the shuffle: row i is i * 10 / 255.
    for x, y in ((s.train, s.train_labels), (s.valid, s.valid_labels)):
        assert torch.equal(x[:, 0], (y * 10).float() / 255.0)
    assert sorted(torch.cat([s.train_labels, s.valid_labels]).tolist()) == list(
        range(20)
    )


def test_load_npz_without_labels(tmp_path):
    path = tmp_path / "d.npz"
    arrays = _npz_arrays()
    np.savez(path, x_train=arrays["x_train"], x_test=arrays["x_test"])
    s = load_dataset("npz", data_path=str(path), valid_fraction=0.25)
    assert (len(s.train), len(s.valid), len(s.test)) == (15, 5, 5)
    assert (s.train_labels, s.valid_labels, s.test_labels) == (None, None, None)


def test_load_npz_missing_x_test_lists_keys(tmp_path):
    path = tmp_path / "d.npz"
    arrays = _npz_arrays()
    np.savez(path, x_train=arrays["x_train"], y_train=arrays["y_train"])
    with pytest.raises(
        DataError, match=r"lacks \['x_test'\]; it holds \['x_train', 'y_train'\]"
    ) as e:
        load_dataset("npz", data_path=path)
    assert "np.savez(path, x_train=..., x_test=..." in str(e.value)


def test_load_npz_path_pointing_nowhere(tmp_path):
    path = tmp_path / "nowhere" / "d.npz"
    with pytest.raises(DataError, match=re.escape(f"--data-path {path}: no such file")):
        load_dataset("npz", data_path=path)


def test_load_npz_random_bytes(tmp_path):
    path = tmp_path / "d.npz"
    path.write_bytes(np.random.default_rng(0).bytes(512))
    with pytest.raises(
        DataError, match=re.escape(f"--data-path {path} is not a readable .npz file")
    ):
        load_dataset("npz", data_path=path)


def test_load_npz_truncated_file(tmp_path):
    # A half-written .npz (a zip archive cut short) must be a DataError too, not
    # zipfile.BadZipFile.
    good, path = tmp_path / "good.npz", tmp_path / "d.npz"
    np.savez(good, **_npz_arrays())
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        DataError, match=re.escape(f"--data-path {path} is not a readable .npz file")
    ):
        load_dataset("npz", data_path=path)


def test_load_npz_label_count_mismatch(tmp_path):
    path = tmp_path / "d.npz"
    arrays = _npz_arrays()
    arrays["y_train"] = arrays["y_train"][:19]
    np.savez(path, **arrays)
    with pytest.raises(
        DataError, match=r"npz: 19 labels for 20 data; give one label per datum"
    ):
        load_dataset("npz", data_path=path)


def test_load_npz_string_labels_are_a_data_error(tmp_path):
    path = tmp_path / "d.npz"
    arrays = _npz_arrays()
    arrays["y_train"] = np.array([f"class{i}" for i in range(20)])
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=r"label"):
        load_dataset("npz", data_path=path)


def test_load_npz_train_test_shape_mismatch(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((10, 4, 4)), x_test=np.zeros((3, 16)))
    with pytest.raises(
        DataError,
        match=re.escape(
            "npz: training data have datum shape (4, 4) but test data (16,)"
        ),
    ):
        load_dataset("npz", data_path=path)


def test_load_npz_checks_values_with_context(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.full((10, 4), np.nan), x_test=np.zeros((3, 4)))
    with pytest.raises(DataError, match=r"npz training data has 40 NaN or infinite"):
        load_dataset("npz", data_path=path)


def test_load_npz_without_data_path():
    with pytest.raises(
        DataError, match=r"--dataset npz needs --data-path FILE.npz \(with x_train"
    ):
        load_dataset("npz")


def test_load_unknown_dataset_lists_valid_names():
    with pytest.raises(
        DataError,
        match=re.escape(
            "unknown dataset 'cifar10'; choose one of "
            "digits, mnist, fashion-mnist, kmnist, npz"
        ),
    ):
        load_dataset("cifar10")
    assert DATASETS == ("digits", "mnist", "fashion-mnist", "kmnist", "npz")


# ---------------------------------------------------- MNIST from local IDX, offline


def _check_mnist_splits(s: Splits, arrays: dict[str, np.ndarray]) -> None:
    x_train, x_test = (
        arrays["train-images-idx3-ubyte"],
        arrays["t10k-images-idx3-ubyte"],
    )
    y_train, y_test = (
        arrays["train-labels-idx1-ubyte"],
        arrays["t10k-labels-idx1-ubyte"],
    )
    assert (len(s.train), len(s.valid), len(s.test)) == (24, 6, 10)
    assert s.image_shape == (28, 28)
    assert s.data_dim == 784
    # The test split keeps the file's order.
    assert torch.equal(s.test, torch.from_numpy(x_test.reshape(10, 784)).float() / 255)
    assert s.test_labels.tolist() == y_test.tolist()
    # Train + valid, put back in file order by pixel (0, 0) = 5 * index.
    rows = torch.cat([s.train, s.valid])
    labels = torch.cat([s.train_labels, s.valid_labels])
    index = torch.round(rows[:, 0] * 255 / 5).long()
    assert sorted(index.tolist()) == list(range(30))
    order = torch.argsort(index)
    expected = torch.from_numpy(x_train.reshape(30, 784)).float() / 255
    assert torch.equal(rows[order], expected)
    assert labels[order].tolist() == y_train.tolist()


def test_mnist_from_flat_gz_folder_offline(tmp_path, cache, monkeypatch):
    def no_download(self):
        raise AssertionError("no download when the files are there")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_download)
    folder = tmp_path / "idx"
    arrays = _mnist_arrays()
    _write_idx(folder, arrays)
    before = _snapshot(folder)
    s = load_dataset("mnist", data_dir=folder, download=False, valid_fraction=0.2)
    _check_mnist_splits(s, arrays)
    assert _snapshot(folder) == before  # the source folder was not written to
    # The unpacked copy went to the XDG cache, one folder per source folder.
    (entry,) = (cache / "pyro_vae").iterdir()
    assert re.fullmatch(r"mnist-[0-9a-f]{12}", entry.name)
    assert sorted(p.name for p in (entry / "MNIST" / "raw").glob("*ubyte")) == sorted(
        IDX_FILES
    )
    # download=True does not download either when the files are there.
    s2 = load_dataset("mnist", data_dir=folder, download=True, valid_fraction=0.2)
    assert torch.equal(s2.train, s.train) and torch.equal(s2.test, s.test)


def test_mnist_from_torchvision_layout_uncompressed(tmp_path, cache):
    folder = tmp_path / "data"
    arrays = _mnist_arrays()
    _write_idx(folder / "MNIST" / "raw", arrays, gz=False)
    before = _snapshot(folder)
    s = load_dataset("mnist", data_dir=str(folder), download=False, valid_fraction=0.2)
    _check_mnist_splits(s, arrays)
    assert _snapshot(folder) == before
    assert not cache.exists()  # read in place: nothing to unpack


def test_mnist_from_torchvision_layout_gz(tmp_path, cache):
    folder = tmp_path / "data"
    arrays = _mnist_arrays()
    _write_idx(folder / "MNIST" / "raw", arrays, gz=True)
    before = _snapshot(folder)
    s = load_dataset("mnist", data_dir=folder, download=False, valid_fraction=0.2)
    _check_mnist_splits(s, arrays)
    assert _snapshot(folder) == before


@pytest.mark.parametrize("present", [0, 3])
def test_mnist_missing_files_no_download(tmp_path, cache, present):
    folder = tmp_path / "idx"
    arrays = _mnist_arrays()
    _write_idx(folder, dict(list(arrays.items())[:present]))
    folder.mkdir(exist_ok=True)
    with pytest.raises(
        DataError, match=re.escape(f"mnist: the data files are not in {folder}")
    ) as e:
        load_dataset("mnist", data_dir=folder, download=False)
    message = str(e.value)
    for name in IDX_FILES:
        assert f"{name}.gz" in message
    assert str(folder / "MNIST" / "raw") in message
    assert "--data-dir" in message
    assert "download failed" not in message


def test_mnist_failed_download_says_which_files_where(tmp_path, cache, monkeypatch):
    def offline(self):
        raise RuntimeError("offline")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    folder = tmp_path / "empty"
    with pytest.raises(
        DataError, match=re.escape(f"mnist: the data files are not in {folder}")
    ) as e:
        load_dataset("mnist", data_dir=folder, download=True)
    message = str(e.value)
    assert message.endswith("The download failed: offline")
    for name in IDX_FILES:
        assert f"{name}.gz" in message
    assert f"in {folder} or in {folder / 'MNIST' / 'raw'}" in message


def _corrupt(arrays: dict[str, np.ndarray], how: str) -> dict[str, bytes]:
    files = {name: _idx_bytes(arr) for name, arr in arrays.items()}
    test = "t10k-images-idx3-ubyte"
    if how == "truncated":
        files[test] = files[test][:500]
    elif how == "header-only":
        files[test] = files[test][:2]
    elif how == "2-d":
        files[test] = _idx_bytes(arrays[test].reshape(10, -1))
    elif how == "int16":
        files[test] = _idx_bytes(arrays[test], type_code=0x0B)
    return files


@pytest.mark.parametrize("how", ["truncated", "header-only", "2-d", "int16"])
def test_mnist_corrupt_idx_is_a_data_error(tmp_path, cache, how):
    folder = tmp_path / "idx"
    folder.mkdir()
    for name, data in _corrupt(_mnist_arrays(), how).items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(data))
    with pytest.raises(
        DataError, match=r"mnist: the IDX files in .* are not valid"
    ) as e:
        load_dataset("mnist", data_dir=folder, download=False)
    assert str(folder) in str(e.value)  # names the folder the user filled
    assert "replace them with the original files" in str(e.value)


@pytest.mark.parametrize("how", ["cut-gzip", "not-gzip"])
def test_mnist_corrupt_gz_is_a_data_error(tmp_path, cache, how):
    folder = tmp_path / "idx"
    _write_idx(folder, _mnist_arrays())
    bad = folder / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:100] if how == "cut-gzip" else b"not gzip")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte"):
        load_dataset("mnist", data_dir=folder, download=False)


def test_mnist_replaced_source_file_is_reread(tmp_path, cache):
    # Fixing a corrupt file in the source folder must fix the load: the unpack
    # cache may not keep serving the old copy.
    folder = tmp_path / "idx"
    arrays = _mnist_arrays()
    folder.mkdir()
    for name, data in _corrupt(arrays, "truncated").items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(data))
    with pytest.raises(DataError):
        load_dataset("mnist", data_dir=folder, download=False)
    _write_idx(folder, arrays)  # the originals again
    s = load_dataset("mnist", data_dir=folder, download=False, valid_fraction=0.2)
    _check_mnist_splits(s, arrays)


# ------------------------------------------- Fashion-MNIST from the Debian package

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def test_require_files_skips_locally_fails_on_ci(tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="missing \\['a.gz'\\]"):
        _require_files(tmp_path, ["a.gz"])
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        _require_files(tmp_path, ["a.gz"])
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="missing \\['a.gz'\\]"):
        _require_files(tmp_path, ["a.gz"])
    (tmp_path / "a.gz").write_bytes(b"")
    _require_files(tmp_path, ["a.gz"])  # present: neither skip nor fail


def test_fashion_mnist_from_debian_package():
    _require_files(FASHION_DIR, [f"{name}.gz" for name in IDX_FILES])
    s = load_dataset("fashion-mnist", data_dir=FASHION_DIR, download=False)
    assert len(s.train) + len(s.valid) == 60000
    assert (len(s.train), len(s.valid), len(s.test)) == (54000, 6000, 10000)
    assert s.image_shape == (28, 28)
    assert s.data_dim == 784
    assert s.train.dtype == torch.float32
    assert s.test.min().item() == 0.0 and s.test.max().item() == 1.0
    # Fashion-MNIST is balanced: 6000 per class in training, 1000 in test.
    labels = torch.cat([s.train_labels, s.valid_labels])
    assert torch.bincount(labels).tolist() == [6000] * 10
    assert torch.bincount(s.test_labels).tolist() == [1000] * 10
