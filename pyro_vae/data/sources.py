"""Where data come from: scikit-learn's digits, torchvision's MNIST family, .npz files.

``load_dataset`` returns :class:`pyro_vae.data.Splits` in [0, 1], before any
binarization. The MNIST family goes through torchvision's own dataset classes: they
download into ``data_dir`` when online, and a folder that already holds the original
``*-idx?-ubyte.gz`` files (flat, or in torchvision's ``<Class>/raw`` layout) works with
no network. The Debian package ``dataset-fashion-mnist`` puts such files in
``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from pyro_vae.data.splits import Splits, check_images, split_train_valid
from pyro_vae.errors import DataError
from pyro_vae.files import atomic_open

__all__ = ["DATASETS", "IDX_FILES", "load_dataset"]

DATASETS = ("digits", "mnist", "fashion-mnist", "kmnist", "npz")
DIGITS_TEST_SIZE = (
    360  # about 20% of scikit-learn's 1797 digits, held out with SPLIT_SEED
)
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_TORCHVISION_CLASSES = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "kmnist": "KMNIST",
}


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike = "data",
    data_path: str | os.PathLike | None = None,
    valid_fraction: float = 0.1,
    download: bool = True,
) -> Splits:
    """Load a dataset by name and split it into train, validation and test.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: where torchvision datasets are looked for and downloaded to.
        data_path: the ``.npz`` file for ``name="npz"``; it holds ``x_train`` and
            ``x_test``, and optionally ``y_train`` and ``y_test``.
        valid_fraction: the share of the training data held out for validation.
        download: let torchvision download missing files.
    """
    if name == "digits":
        x_train, y_train, x_test, y_test = _digits()
    elif name in _TORCHVISION_CLASSES:
        x_train, y_train, x_test, y_test = _torchvision(name, Path(data_dir), download)
    elif name == "npz":
        x_train, y_train, x_test, y_test = _npz(data_path)
    else:
        raise DataError(
            f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}"
        )
    train, shape = check_images(x_train, f"{name} training data")
    test, test_shape = check_images(x_test, f"{name} test data")
    if test_shape != shape:
        raise DataError(
            f"{name}: training data have datum shape {shape} but test data {test_shape}"
        )
    y_train, y_test = (
        _labels(y_train, len(train), name),
        _labels(y_test, len(test), name),
    )
    train, valid, y_train, y_valid = split_train_valid(train, y_train, valid_fraction)
    return Splits(train, valid, test, shape, y_train, y_valid, y_test)


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)  # grey levels 0..16
    perm = np.random.default_rng(0).permutation(len(x))
    test, train = perm[:DIGITS_TEST_SIZE], perm[DIGITS_TEST_SIZE:]
    return x[train], bunch.target[train], x[test], bunch.target[test]


def _labels(y: object, n: int, name: str) -> torch.Tensor | None:
    if y is None:
        return None
    y = np.asarray(y)
    if y.dtype.kind not in "biu":
        raise DataError(
            f"{name}: labels have dtype {y.dtype}; give integer class labels "
            "(e.g. np.unique(y, return_inverse=True)[1])"
        )
    y = torch.as_tensor(y).reshape(-1)
    if len(y) != n:
        raise DataError(
            f"{name}: {len(y)} labels for {n} data; give one label per datum"
        )
    return y


def _npz(path: str | os.PathLike | None) -> tuple:
    if path is None:
        raise DataError(
            "--dataset npz needs --data-path FILE.npz (with x_train, x_test)"
        )
    save = "np.savez(path, x_train=..., x_test=...)"
    if Path(path).is_dir():
        raise DataError(
            f"--data-path {path} is a directory; give the .npz file itself, written "
            f"with {save}"
        )
    try:
        with open(path, "rb") as fh:
            loaded = np.load(fh, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DataError(
                    f"--data-path {path} holds a single array (a .npy file), not an "
                    f".npz archive of named arrays; save the splits with {save}"
                )
            with loaded as f:
                arrays = {key: f[key] for key in f.files}
    except FileNotFoundError:
        raise DataError(f"--data-path {path}: no such file") from None
    except DataError:
        raise
    except ValueError as err:
        if "Object arrays cannot be loaded" not in str(err):
            raise _unreadable(path, err) from None
        raise DataError(
            f"--data-path {path} holds arrays of Python objects (dtype object), which "
            "pyro_vae does not load: unpickling them could run code (allow_pickle is "
            "off). Save plain numeric arrays instead, e.g. "
            "np.savez(path, x_train=np.asarray(x_train, dtype=np.float32), "
            "x_test=np.asarray(x_test, dtype=np.float32))"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise _unreadable(path, err) from None
    missing = {"x_train", "x_test"} - set(arrays)
    if missing:
        raise DataError(
            f"{path} lacks {sorted(missing)}; it holds {sorted(arrays)}. Save it with "
            "np.savez(path, x_train=..., x_test=..., y_train=..., y_test=...)."
        )
    return (
        arrays["x_train"],
        arrays.get("y_train"),
        arrays["x_test"],
        arrays.get("y_test"),
    )


def _unreadable(path: str | os.PathLike, err: Exception) -> DataError:
    return DataError(
        f"--data-path {path} is not a readable .npz file ({type(err).__name__}); "
        "it may be truncated or corrupt. Write it again with np.savez."
    )


def _torchvision(name: str, data_dir: Path, download: bool) -> tuple:
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TORCHVISION_CLASSES[name])
    root = _stage_idx_files(cls.__name__, data_dir)
    if root is None:
        root = data_dir
        if not download:
            raise DataError(_missing_files_message(name, cls.__name__, data_dir))
        try:
            cls(root=str(root), train=True, download=True)
        except Exception as err:  # offline: URLError, RuntimeError, OSError
            raise DataError(
                _missing_files_message(name, cls.__name__, data_dir)
                + f"\nThe download failed: {str(err).splitlines()[0]}"
            ) from None
    _check_idx_files(name, cls.__name__, data_dir, root)
    try:
        train = cls(root=str(root), train=True, download=False)
        test = cls(root=str(root), train=False, download=False)
    except (AssertionError, RuntimeError, OSError, ValueError, TypeError) as err:
        raise DataError(
            f"{name}: the IDX files in {data_dir} (unpacked to "
            f"{root / cls.__name__ / 'raw'}) are not valid ({type(err).__name__}: "
            f"{err}); replace them with the original files."
        ) from None
    return (
        train.data.numpy(),
        train.targets.numpy(),
        test.data.numpy(),
        test.targets.numpy(),
    )


#: IDX type codes (the third byte of the file)
_IDX_TYPES = {
    0x08: "unsigned bytes",
    0x09: "signed bytes",
    0x0B: "16-bit integers",
    0x0C: "32-bit integers",
    0x0D: "32-bit floats",
    0x0E: "64-bit floats",
}


def _check_idx_files(name: str, class_name: str, data_dir: Path, root: Path) -> None:
    """Check the headers and sizes of the four IDX files torchvision will read, and
    name the file the user gave (not its unpacked copy) when one is wrong."""
    raw = root / class_name / "raw"
    sources = _idx_sources(class_name, data_dir)
    counts = {}
    for f in IDX_FILES:
        source = sources.get(f, raw / f)
        problem, count = _idx_problem(raw / f, 3 if "images" in f else 1)
        if problem:
            raise DataError(
                f"{name}: the IDX files in {data_dir} are not valid: {source} "
                f"{problem}; replace them with the original files."
            )
        counts[f] = count
    for split in ("train", "t10k"):
        images, labels = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        if counts[images] != counts[labels]:
            raise DataError(
                f"{name}: the IDX files in {data_dir} are not valid: "
                f"{sources.get(images, raw / images)} holds {counts[images]} images "
                f"but {sources.get(labels, raw / labels)} {counts[labels]} labels; "
                "replace them with the original files."
            )


def _idx_problem(path: Path, ndim: int) -> tuple[str | None, int]:
    """What is wrong with the IDX file at ``path`` in words, and its first size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4 + 4 * ndim)
    except OSError as err:
        return f"cannot be read ({type(err).__name__}: {err})", 0
    if len(head) < 4:
        return f"is {size} bytes long, too short for an IDX header (truncated?)", 0
    if head[0] or head[1]:
        return (
            f"does not start with the IDX magic number (two zero bytes, a type code, "
            f"the number of dimensions) but with {head[:4].hex()}: it is not an IDX "
            "file",
            0,
        )
    if head[2] != 0x08:
        kind = _IDX_TYPES.get(head[2], "an unknown type")
        return (
            f"holds {kind} (type code 0x{head[2]:02X}); these files hold unsigned "
            "bytes (0x08)",
            0,
        )
    what = "an images file has 3 (N, H, W)" if ndim == 3 else "a labels file has 1"
    if head[3] != ndim:
        return f"has {head[3]} dimensions; {what}", 0
    if len(head) < 4 + 4 * ndim:
        return f"is {size} bytes long, too short for its header (truncated?)", 0
    shape = tuple(
        int.from_bytes(head[i : i + 4], "big") for i in range(4, len(head), 4)
    )
    data = size - len(head)
    if data != math.prod(shape):
        how = "is truncated" if data < math.prod(shape) else "is too long"
        return (
            f"{how}: its header says shape {shape}, {math.prod(shape)} bytes of data, "
            f"and it holds {data}",
            0,
        )
    return None, shape[0]


def _idx_sources(class_name: str, data_dir: Path) -> dict[str, Path]:
    """The user's file for each IDX file, looked for as :func:`_stage_idx_files`
    does (torchvision's layout first, then ``.gz`` or plain files in data_dir)."""
    native = data_dir / class_name / "raw"
    if all((native / f).is_file() for f in IDX_FILES):
        return {f: native / f for f in IDX_FILES}
    sources = {}
    for f in IDX_FILES:
        candidates = [native / f"{f}.gz", data_dir / f, data_dir / f"{f}.gz"]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is not None:
            sources[f] = hit
    return sources


def _stage_idx_files(class_name: str, data_dir: Path) -> Path | None:
    """Find the four IDX files and lay them out as torchvision expects.

    Returns the root to hand torchvision (``root/<class_name>/raw/<file>``), or None
    when some file is missing. Files found elsewhere are unpacked into a per-user
    cache keyed by their folder, so a system folder (a Debian package) is never
    written to.
    """
    native = data_dir / class_name / "raw"
    if all((native / f).is_file() for f in IDX_FILES):
        return data_dir
    found = {}
    for f in IDX_FILES:
        candidates = [native / f"{f}.gz", data_dir / f, data_dir / f"{f}.gz"]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            return None
        found[f] = hit
    key = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:12]
    root = _cache_dir() / f"{class_name.lower()}-{key}"
    raw = root / class_name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for f, src in found.items():
        _unpack(src, raw / f)
    return root


def _unpack(src: Path, dest: Path) -> None:
    """Copy or gunzip ``src`` to ``dest`` unless ``dest`` came from this very file."""
    stat = src.stat()
    stamp = f"{src.resolve()} {stat.st_size} {stat.st_mtime_ns}\n"
    stamp_file = dest.with_name(dest.name + ".source")
    if dest.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return
    # atomic (pyro_vae.files): processes of a distributed run may unpack at once,
    # and a half-unpacked file never carries the final name
    opener = gzip.open if src.suffix == ".gz" else open
    try:
        with opener(src, "rb") as fin, atomic_open(dest, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"{src} cannot be unpacked ({type(err).__name__}: {err}); it is "
            "truncated or not gzip data. Replace it with the original file."
        ) from None
    stamp_file.write_text(stamp)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pyro_vae"


def _missing_files_message(name: str, class_name: str, data_dir: Path) -> str:
    files = ", ".join(f"{f}.gz" for f in IDX_FILES)
    return (
        f"{name}: the data files are not in {data_dir}. Put the original files "
        f"({files}) in {data_dir} or in {data_dir / class_name / 'raw'}, or run once "
        f"with network access so torchvision downloads them there (--data-dir sets "
        f"the folder)."
    )
