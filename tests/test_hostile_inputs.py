"""Hostile inputs at the command lines and the Python API: one line that names the
problem and its fix, never a traceback from numpy, torch or Pyro, and argparse's
usage block only for a malformed command (issue 14: "Messages" and "The Python API
checks its inputs")."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_vae
from pyro_vae.cli.config import FitConfig
from pyro_vae.cli.evaluate import main as eval_main
from pyro_vae.cli.fit import main as fit_main
from pyro_vae.cli.fit import parse_args
from pyro_vae.data import check_images
from pyro_vae.data.sources import IDX_FILES, load_dataset
from pyro_vae.errors import ConfigError, DataError, PyroVAEError
from pyro_vae.memory import memory_guard
from pyro_vae.training.checkpoint import CheckpointError

HUGE = str(10**13)
FAST = ["--epochs", "1", "--quiet", "--eval-k", "0"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One epoch on digits, 64 pixels, Bernoulli likelihood; nothing evaluated."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    argv = [*FAST, "--hidden", "16", "--latent-dim", "2", "--out", str(out)]
    assert fit_main(argv) == 0
    return out


@pytest.fixture
def run_dir(trained_run, tmp_path) -> Path:
    """A private copy of the run, for tests that edit it."""
    return shutil.copytree(trained_run, tmp_path / "run")


@pytest.fixture(scope="module")
def run(trained_run) -> pyro_vae.TrainedVAE:
    return pyro_vae.load(trained_run)


@pytest.fixture(scope="module")
def x(run) -> torch.Tensor:
    """Five binarized test digits, float32 (N, 64), as the run scores them."""
    return run.data().test[:5]


def _one_line(capsys, *phrases: str) -> str:
    """stderr is one line holding every phrase, with no usage block."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "usage:" not in err and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in err, err
    return err


def _edit_stored_config(run_dir: Path, **changes) -> Path:
    path = run_dir / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    payload["config"].update(changes)
    torch.save(payload, path)
    return path


# ---------------------------------------------- fit: a bad value gets its one line


BAD_FIT_VALUES = [
    (["--seed", "-1"], ["--seed must be an integer from 0 to 2**32 - 1", "got -1"]),
    (["--seed", str(10**23)], ["--seed must be an integer from 0 to 2**32 - 1"]),
    (["--seed", str(2**32)], ["(numpy's seed range), got 4294967296"]),
    (["--epochs", str(10**20)], ["--epochs must be at most 1,000,000,000"]),
    (["--hidden", HUGE], ["this run needs about", "GB", "lower --hidden (now"]),
    (["--hidden", f"400,{HUGE}"], ["lower --hidden (now 400,10000000000000)"]),
    (["--latent-dim", HUGE], ["this run needs about", "lower --latent-dim"]),
    (["--prior", "mog", "--components", HUGE], ["lower --components"]),
    (["--num-particles", HUGE], ["one training step", "lower --num-particles"]),
    (["--eval-k", str(10**12)], ["final evaluation", "lower --eval-k"]),
    (["--guide", "flow", "--flow-steps", HUGE], ["lower --flow-steps"]),
    (["--guide", "lowrank", "--rank", HUGE], ["lower --rank"]),
    (["--prior", "vamp", "--pseudo-inputs", HUGE], ["lower --pseudo-inputs"]),
    (["--checkpoint-every", str(2**64)], ["at most 2**63 - 1"]),
    (["--lr", "-1"], ["--lr must be a positive finite number, got -1.0"]),
    (["--lr", "nan"], ["--lr must be a positive finite number, got nan"]),
    (["--hidden", ",,"], ["--hidden takes comma-separated positive integers"]),
    (["--dataset", "cifar"], ["invalid choice: 'cifar'"]),
    (["--epochs", "1.5"], ["argument --epochs: invalid int value: '1.5'"]),
]


@pytest.mark.parametrize(
    "argv, phrases", BAD_FIT_VALUES, ids=[" ".join(a)[:40] for a, _ in BAD_FIT_VALUES]
)
def test_fit_bad_value_is_one_line_without_usage(tmp_path, capsys, argv, phrases):
    status = fit_main(["--epochs", "1", "--quiet", *argv, "--out", str(tmp_path / "r")])
    assert status == 2
    _one_line(capsys, "python -m pyro_vae.fit: error: ", *phrases)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--lr"], "argument --lr: expected one argument"),
    ],
)
def test_fit_malformed_command_keeps_its_usage(capsys, argv, phrase):
    assert fit_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m pyro_vae.fit"), err
    assert phrase in err


@pytest.mark.parametrize(
    "argv, field, value",
    [
        (["--loss", "infovae", "--lam", "-1e9"], "lam", -1e9),
        (["--loss", "infovae", "--lam", "-1E+3"], "lam", -1000.0),
        (["--loss", "infovae", "--alpha", "-0.5"], "alpha", -0.5),
        (["--loss", "infovae", "--alpha", "-.5"], "alpha", -0.5),
        (["--loss", "infovae", "--alpha", "-2"], "alpha", -2.0),
    ],
)
def test_negative_numbers_are_values(argv, field, value):
    assert getattr(parse_args(argv), field) == value


def test_negative_infinity_is_a_value_then_refused(capsys):
    assert fit_main(["--loss", "infovae", "--lam", "-inf"]) == 2
    _one_line(capsys, "--alpha and --lam must be finite, got 0.0, -inf")


def test_empty_paths_are_refused(capsys):
    for flag in ("--out", "--data-path", "--data-dir"):
        assert fit_main([flag, ""]) == 2
        _one_line(capsys, f"{flag} is an empty string; give a path")


def test_resume_without_checkpoint_is_one_line(tmp_path, capsys):
    assert fit_main(["--resume", str(tmp_path / "nowhere")]) == 2
    _one_line(capsys, "no checkpoint at")


def test_resume_names_the_stored_config_of_unknown_keys(run_dir, capsys):
    path = _edit_stored_config(run_dir, colour="red")
    assert fit_main(["--resume", str(run_dir)]) == 2
    _one_line(
        capsys,
        f"unknown config keys ['colour'] in the config stored in {path}",
        "does not know them",
    )


def test_resume_with_a_stored_config_of_wrong_types(run_dir, capsys):
    # was a TypeError traceback from inside FitConfig.__post_init__
    path = _edit_stored_config(run_dir, epochs="5")
    assert fit_main(["--resume", str(run_dir)]) == 2
    _one_line(
        capsys, f"the config stored in {path}: --epochs must be an integer, got '5'"
    )


def test_config_from_python_checks_types_and_takes_lists():
    with pytest.raises(ConfigError, match="--latent-dim must be an integer, got 2.5"):
        FitConfig(latent_dim=2.5)
    with pytest.raises(ConfigError, match="--quiet must be True or False, got 1"):
        FitConfig(quiet=1)
    assert FitConfig(hidden=[32, 16]).hidden == (32, 16)
    with pytest.raises(ConfigError, match="is a list, not a mapping of settings"):
        FitConfig.from_dict([1, 2], source="x")


# ------------------------------------------------------ memory: "needs about X GB"


def test_an_allocation_failure_says_how_much_and_what_to_lower():
    message = (
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
        "allocate memory: you tried to allocate 2000000000 bytes."
    )
    with (
        pytest.raises(ConfigError, match=r"the networks needs about 2\.0 GB") as e,
        memory_guard(2 * 10**9, "the networks", "--hidden"),
    ):
        raise RuntimeError(message)
    assert str(e.value).endswith("; lower --hidden")
    with (
        pytest.raises(ConfigError, match="needs about 50 GB.*lower K"),
        memory_guard(5 * 10**10, "evaluate", "K"),
    ):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate")
    with pytest.raises(RuntimeError, match="mat1 and mat2"), memory_guard(1, "a", "b"):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")


# ------------------------------------------------------------- evaluate's parser


@pytest.mark.parametrize(
    "argv, phrases",
    [
        (["--k", str(10**12)], ["per datum", "lower --k"]),
        (["--seed", str(10**30)], ["--seed: must be an integer from -2**63"]),
        (["--k", "0"], ["--k: must be a positive integer, got 0"]),
        (["--split", "foo"], ["invalid choice: 'foo'"]),
    ],
)
def test_evaluate_bad_value_is_one_line(trained_run, capsys, argv, phrases):
    assert eval_main([str(trained_run), *argv]) == 2
    _one_line(capsys, "python -m pyro_vae.evaluate: error: ", *phrases)
    assert not (trained_run / "evaluation.json").exists()


def test_evaluate_unknown_flag_keeps_its_usage(trained_run, capsys):
    assert eval_main([str(trained_run), "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m pyro_vae.evaluate"), err
    assert "unrecognized arguments: --bogus" in err


def test_evaluate_k_too_large_for_the_data(run_dir, capsys):
    # 8 GB of log-weights per datum (the parser's check passes on a host with more
    # memory); a data chunk of 100 data needs 800 GB, refused before allocating
    status = eval_main([str(run_dir), "--k", str(10**9), "--n", "100"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err, err
    if status == 2:  # a host with less than 8 GB
        assert "lower --k" in err, err
    else:
        assert status == 1, err
        buffer = "a 1000000000 x 100 float64 buffer of log-weights) needs about"
        assert buffer in err and "800 GB" in err, err
        assert "lower K (--k) or data_chunk" in err, err


# ------------------------------------------------------------------ load() errors


def test_load_names_the_first_mismatching_weight(run_dir):
    path = _edit_stored_config(run_dir, hidden=[32])
    with pytest.raises(CheckpointError) as e:
        pyro_vae.load(run_dir)
    message = str(e.value)
    assert message.startswith(f"{path} does not fit the networks that the config")
    assert "stored in it" in message and "config.json" not in message
    assert "is (16, 2) in the checkpoint but (32, 2) in the networks" in message
    assert "restore the checkpoint or re-train" in message


def test_resume_names_the_first_mismatching_weight(run_dir, capsys):
    """Stored config and config.json agree, the weights do not: say which weight."""
    import json

    _edit_stored_config(run_dir, hidden=[32])
    config = json.loads((run_dir / "config.json").read_text())
    config["hidden"] = [32]
    (run_dir / "config.json").write_text(json.dumps(config))
    assert fit_main(["--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "is (16, 2) in the checkpoint but (32, 2) in the networks" in err, err
    assert "Error(s) in loading state_dict" not in err


def test_load_names_a_missing_weight(run_dir):
    _edit_stored_config(run_dir, prior="mog")
    with pytest.raises(CheckpointError, match=r"model\.prior\.logits \(10,\) is not"):
        pyro_vae.load(run_dir)


def test_load_names_the_file_of_unknown_config_keys(run_dir):
    path = _edit_stored_config(run_dir, colour="red")
    with pytest.raises(CheckpointError, match="unknown config keys") as e:
        pyro_vae.load(run_dir)
    assert f"in the config stored in {path}" in str(e.value)


def test_load_refuses_networks_too_big_to_build(run_dir):
    _edit_stored_config(run_dir, hidden=[10**13])
    with pytest.raises(ConfigError, match="needs about .* GB of memory") as e:
        pyro_vae.load(run_dir)
    assert "restore the stored config if edited" in str(e.value)


@pytest.mark.parametrize(
    "run_dir_arg, phrase",
    [(None, "got None"), (3, "got 3")],
)
def test_load_needs_a_path(run_dir_arg, phrase):
    with pytest.raises(ConfigError, match="give the run directory as a path") as e:
        pyro_vae.load(run_dir_arg)
    assert phrase in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine with no GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", 0, torch.device("cuda")])
def test_load_on_cuda_without_cuda(trained_run, device):
    with pytest.raises(ConfigError, match="but torch sees no CUDA GPU here; use "):
        pyro_vae.load(trained_run, device=device)


@pytest.mark.parametrize("device", ["tpu", "", 1.5])
def test_load_on_an_unknown_device(trained_run, device):
    with pytest.raises(ConfigError, match="device"):
        pyro_vae.load(trained_run, device=device)


# ------------------------------------------------------- the Python API's inputs


def test_numpy_lists_and_float64_are_accepted(run, x):
    want = run.evaluate(x, 10, seed=0).log_px
    for given in (x.numpy(), x.double(), x.tolist(), x.bool(), x.long()):
        assert torch.equal(run.evaluate(given, 10, seed=0).log_px, want)
    assert run.reconstruct(x.numpy()).shape == (5, 64)
    assert run.reconstruct(x.reshape(5, 8, 8)).shape == (5, 64)  # image-shaped


def test_tensors_that_need_grad_are_accepted(run, x):
    given = x.clone().requires_grad_()
    assert run.evaluate(given, 10, seed=0).log_px.shape == (5,)
    assert run.reconstruct(given).shape == (5, 64)


@pytest.mark.parametrize("method", ["evaluate", "reconstruct"])
@pytest.mark.parametrize(
    "make, phrase",
    [
        (
            lambda x: x[0],
            "has shape (64,); this run's model takes (N, 64) or (N, 8, 8)",
        ),
        (lambda x: x[0], "for one datum, x[None]"),
        (lambda x: x[:, :10], "has shape (5, 10); this run's model takes (N, 64)"),
        (lambda x: torch.tensor(1.0), "has shape ()"),
        (lambda x: x[:0], "has no rows (shape (0, 64))"),
        (lambda x: x + float("nan"), "has 320 NaN or infinite values (first in row 0)"),
        (lambda x: x * 255, "has values in [0, 255]; this run was trained on data"),
        (lambda x: (x * 3).long(), "holds integers in [0, 3]; give floats in [0, 1]"),
        (lambda x: x.numpy().astype(str), "holds <U"),
        (lambda x: "digits", "must be a torch.Tensor or numpy array (N, 64), got str"),
        (lambda x: [[0.0, 1.0], [0.5]], "is not a rectangular array"),
        (lambda x: x.to(torch.complex64), "is complex"),
    ],
)
def test_bad_inputs_are_data_errors(run, x, method, make, phrase):
    args = (make(x), 10) if method == "evaluate" else (make(x),)
    with pytest.raises(DataError) as e:
        getattr(run, method)(*args)
    assert str(e.value).startswith(f"{method}: x "), str(e.value)
    assert phrase in str(e.value)


def test_evaluate_checks_the_likelihoods_support(run, x):
    with pytest.raises(DataError) as e:
        run.evaluate(x * 0.5, 10)
    message = str(e.value)
    assert message.startswith("evaluate: x does not fit the bernoulli likelihood")
    assert "needs binary data in {0, 1}" in message
    run.reconstruct(x * 0.5)  # encoding grey levels is fine


@pytest.mark.parametrize(
    "k, phrase",
    [
        (1, "k must be a whole number >= 2, got 1"),
        (10.5, "k must be a whole number >= 2, got 10.5 (float)"),
        ("10", "got '10' (str)"),
        (True, "got True (bool)"),
        (10**12, "needs about"),
    ],
)
def test_evaluate_checks_k(run, x, k, phrase):
    with pytest.raises(ConfigError) as e:
        run.evaluate(x, k)
    assert phrase in str(e.value)


def test_evaluate_checks_the_seed(run, x):
    with pytest.raises(ConfigError, match="seed must be None or an integer"):
        run.evaluate(x, 10, seed=10**30)
    with pytest.raises(ConfigError, match="seed must be None or an integer"):
        run.evaluate(x, 10, seed="0")
    assert run.evaluate(x, 10, seed=None).log_px.shape == (5,)


@pytest.mark.parametrize(
    "n, phrase",
    [
        (0, "n must be a whole number >= 1, got 0"),
        (-1, "got -1"),
        (1.5, "got 1.5 (float)"),
        ("3", "got '3' (str)"),
        (10**13, "sample(10000000000000) needs about"),
    ],
)
def test_sample_checks_n(run, n, phrase):
    with pytest.raises(ConfigError) as e:
        run.sample(n)
    assert phrase in str(e.value)


def test_sample_takes_numpy_and_tensor_counts(run):
    assert run.sample(np.int64(3)).shape == (3, 64)
    assert run.sample(torch.tensor(2)).shape == (2, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inputs_move_to_the_models_device(trained_run, x):
    on_cpu = pyro_vae.load(trained_run)
    on_gpu = pyro_vae.load(trained_run, device="cuda")
    assert on_cpu.evaluate(x.cuda(), 10, seed=0).log_px.shape == (5,)
    assert on_gpu.reconstruct(x).device.type == "cuda"
    assert on_gpu.evaluate(x.numpy(), 10, seed=0).log_px.shape == (5,)


def test_every_api_error_is_a_pyro_vae_error(run, x):
    # the CLI prints these as one line; none escapes from torch or Pyro
    for call in (
        lambda: run.evaluate(x[0], 10),
        lambda: run.reconstruct(None),
        lambda: run.sample(0),
        lambda: pyro_vae.load(None),
    ):
        with pytest.raises(PyroVAEError):
            call()


# ---------------------------------------------------------------- data messages


def test_float_data_up_to_16_get_the_right_divisor():
    with pytest.raises(DataError) as e:
        check_images(np.array([[0.0, 3.0], [16.0, 7.5]]), "x")
    message = str(e.value)
    assert "values in [0, 16], outside [0, 1]" in message
    assert "the largest value is 16" in message and "x / 16" in message
    assert "divide by 255" not in message


def test_negative_data_get_a_shift_and_scale_hint():
    with pytest.raises(DataError, match=r"\(x - x\.min\(\)\) / \(x\.max\(\)"):
        check_images(np.array([[-1.0, 0.5]]), "x")


def _npz_fails(tmp_path, capsys, path, *phrases) -> None:
    argv = ["--dataset", "npz", "--data-path", str(path), *FAST]
    assert fit_main([*argv, "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err, err
    for phrase in phrases:
        assert phrase in err, err


def test_object_array_npz_says_python_objects(tmp_path, capsys):
    path = tmp_path / "obj.npz"
    x = np.zeros((20, 4), np.float32)
    np.savez(path, x_train=np.array([x[0], "a"], dtype=object), x_test=x)
    _npz_fails(
        tmp_path,
        capsys,
        path,
        f"--data-path {path} holds arrays of Python objects (dtype object)",
        "allow_pickle is off",
        "np.asarray(x_train, dtype=np.float32)",
    )
    assert "truncated or corrupt" not in capsys.readouterr().err


def test_npz_path_to_a_directory(tmp_path, capsys):
    _npz_fails(tmp_path, capsys, tmp_path, f"--data-path {tmp_path} is a directory")


def test_npz_path_to_a_npy_file(tmp_path, capsys):
    # was a TypeError traceback: np.load returns an array, not an archive
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((20, 4), np.float32))
    _npz_fails(tmp_path, capsys, path, "holds a single array (a .npy file)", "np.savez")


# ------------------------------------------------------------ IDX files, named


def _idx(arr: np.ndarray, type_code: int = 0x08, magic: int = 0) -> bytes:
    header = struct.pack(">HBB", magic, type_code, arr.ndim)
    header += b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(">u1").tobytes()


def _mnist_files(folder: Path, **override: bytes) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(30) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(10) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        data = override.get(name.replace("-", "_"), None) or _idx(arrays[name])
        (folder / f"{name}.gz").write_bytes(gzip.compress(data))


@pytest.mark.parametrize(
    "bad, data, phrase",
    [
        (
            "t10k-labels-idx1-ubyte",
            _idx(np.arange(10) % 10, magic=0x1F8B),
            "does not start with the IDX magic number",
        ),
        (
            "train-images-idx3-ubyte",
            _idx(np.zeros((30, 28, 28)), type_code=0x0D),
            "holds 32-bit floats (type code 0x0D); these files hold unsigned bytes",
        ),
        (
            "t10k-images-idx3-ubyte",
            _idx(np.zeros((10, 28, 28)))[:-5],
            "is truncated: its header says shape (10, 28, 28), 7840 bytes of data, "
            "and it holds 7835",
        ),
        (
            "train-labels-idx1-ubyte",
            _idx(np.zeros((30, 2))),
            "has 2 dimensions; a labels file has 1",
        ),
    ],
    ids=["magic", "float-type", "truncated", "2-d-labels"],
)
def test_idx_errors_name_the_bad_file(tmp_path, monkeypatch, bad, data, phrase):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "idx"
    _mnist_files(folder, **{bad.replace("-", "_"): data})
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=folder, download=False)
    message = str(e.value)
    assert message.startswith(f"mnist: the IDX files in {folder} are not valid: ")
    assert f"{folder / bad}.gz {phrase}" in message, message
    assert message.endswith("replace them with the original files.")


def test_idx_image_and_label_counts_must_agree(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "idx"
    _mnist_files(folder, train_labels_idx1_ubyte=_idx(np.arange(20) % 10))
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=folder, download=False)
    assert (
        f"{folder}/train-images-idx3-ubyte.gz holds 30 images but "
        f"{folder}/train-labels-idx1-ubyte.gz 20 labels"
    ) in str(e.value)
