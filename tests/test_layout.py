"""Packaging and the direction of imports that the design card fixes."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import pyro_vae.guides
import pyro_vae.models

REPO = Path(__file__).resolve().parents[1]
THIRD_PARTY_OK_IN_PARTS = {"torch", "pyro"}
ASSEMBLERS = {"pyro_vae.cli.fit", "pyro_vae.cli.build", "pyro_vae.cli.parts"}


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by a file (relative ones resolved)."""
    package = ".".join(("pyro_vae", *path.relative_to(REPO).with_suffix("").parts[:-1]))
    package = package.replace("pyro_vae.pyro_vae", "pyro_vae")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = (
                    package.rsplit(".", node.level - 1)[0]
                    if node.level > 1
                    else package
                )
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                names.add(node.module)
    return names


def _allowed_in_parts(name: str) -> bool:
    top = name.split(".")[0]
    return (
        top in sys.stdlib_module_names
        or top in THIRD_PARTY_OK_IN_PARTS
        or name == "pyro_vae.nn"
    )


@pytest.mark.parametrize("folder", ["models", "guides"])
def test_parts_import_only_torch_pyro_and_nn(folder):
    own = f"pyro_vae.{folder}"
    for path in sorted((REPO / folder).glob("*.py")):
        bad = {
            name
            for name in _imports(path)
            if not (_allowed_in_parts(name) or name.startswith(own))
        }
        assert not bad, f"{path.name} imports {sorted(bad)}"


#: The layers, lowest first. A module may import its own layer and the layers below
#: it, never one above; models and guides have their own, stricter rule (above).
#: A package's ``__main__`` and the root's command modules are entry points: they
#: run a command, so they sit on top with the package's public surface.
LAYERS = [
    (
        "base",
        (
            "pyro_vae.errors",
            "pyro_vae.nn",
            "pyro_vae.files",
            "pyro_vae.memory",
            "pyro_vae.rng",
        ),
    ),
    ("data", ("pyro_vae.data",)),
    ("parts", ("pyro_vae.models", "pyro_vae.guides")),
    ("losses", ("pyro_vae.losses",)),
    ("estimators", ("pyro_vae.evaluate",)),
    ("training", ("pyro_vae.training",)),
    ("cli", ("pyro_vae.cli",)),
    (
        "entry",
        (
            "pyro_vae",
            "pyro_vae.__main__",
            "pyro_vae.fit",
            "pyro_vae.report",
            "pyro_vae.evaluate.__main__",
        ),
    ),
]
ENTRY_POINTS = dict(LAYERS)["entry"]
#: within a layer, these never import each other
APART = [("pyro_vae.models", "pyro_vae.guides")]


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    name = ".".join(("pyro_vae", *parts) if parts[0] in ("models", "guides") else parts)
    return name.removesuffix(".__init__")


def _layer(name: str) -> int:
    """The index in :data:`LAYERS` of module ``name``: its longest matching prefix."""
    if name in ENTRY_POINTS:
        return len(LAYERS) - 1
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS[:-1]):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{name} is in no layer: add it to LAYERS"
    return rank


def _package_files() -> list[Path]:
    files = sorted((REPO / "pyro_vae").rglob("*.py"))
    files += sorted((REPO / "models").rglob("*.py"))
    return files + sorted((REPO / "guides").rglob("*.py"))


def test_every_module_imports_only_its_layer_and_below():
    checked = 0
    for path in _package_files():
        mine = _module(path)
        for name in _imports(path):
            if not name.startswith("pyro_vae"):
                continue
            checked += 1
            assert _layer(name) <= _layer(mine), (
                f"{mine} ({LAYERS[_layer(mine)][0]}) imports {name} "
                f"({LAYERS[_layer(name)][0]}), a higher layer"
            )
            for a, b in APART:
                for x, y in ((a, b), (b, a)):
                    assert not (mine.startswith(x) and name.startswith(y)), (
                        f"{mine} imports {name}"
                    )
    assert checked > 100


def test_the_layer_check_can_fail():
    assert _layer("pyro_vae.training.loop") > _layer("pyro_vae.data.splits")
    assert _layer("pyro_vae.evaluate.marginal") < _layer("pyro_vae.cli.config")
    assert _layer("pyro_vae.evaluate.__main__") == len(LAYERS) - 1
    with pytest.raises(AssertionError, match="in no layer"):
        _layer("pyro_vae.somewhere_new")


def test_root_holds_only_the_base_and_the_commands():
    """The root of the package says the pipeline: subpackages, a few base modules."""
    root = {p.stem for p in (REPO / "pyro_vae").glob("*.py")}
    assert root == {
        "__init__",
        "__main__",
        "errors",
        "nn",
        "files",
        "memory",
        "rng",
        "fit",
        "report",
    }


def test_checker_sees_a_forbidden_import(tmp_path, monkeypatch):
    # The checker must be able to fail: a models file importing guides is caught.
    fake = REPO / "models" / "_tmp_forbidden.py"
    monkeypatch.setattr(Path, "read_text", lambda self: "from pyro_vae.guides import X")
    assert "pyro_vae.guides" in _imports(fake)
    assert not _allowed_in_parts("pyro_vae.guides")


def test_editable_install_maps_models_and_guides_to_repo_folders():
    assert Path(pyro_vae.models.__file__).resolve() == REPO / "models" / "__init__.py"
    assert Path(pyro_vae.guides.__file__).resolve() == REPO / "guides" / "__init__.py"


def test_wheel_contains_models_and_guides_inside_pyro_vae(tmp_path):
    # Build from a clean copy: setuptools reuses REPO/build, whose stale files
    # would hide a package missing from pyproject's list.
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=lambda d, names: [
            n
            for n in names
            if (d == str(REPO) and n in {"build", ".git", "runs", "data", ".venv"})
            or ".egg" in n
            or n == "__pycache__"
        ],
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("pyro_vae-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # every source file of the repo, at its installed path (a hand-kept package
    # list once left pyro_vae.evaluate and pyro_vae.losses out of the wheel)
    sources = {
        f"pyro_vae/{path.relative_to(REPO / 'pyro_vae').as_posix()}"
        for path in (REPO / "pyro_vae").rglob("*.py")
    }
    for part in ("models", "guides"):
        sources |= {
            f"pyro_vae/{part}/{path.relative_to(REPO / part).as_posix()}"
            for path in (REPO / part).rglob("*.py")
        }
    assert "pyro_vae/models/vae.py" in sources and "pyro_vae/losses/mmd.py" in sources
    assert sorted(sources - names) == []
    tops = {n.split("/")[0] for n in names}
    assert "models" not in tops and "guides" not in tops


def test_no_source_file_is_ignored_by_git():
    """A source file that .gitignore hides never reaches a clone (data/ once hid
    pyro_vae/data/__init__.py, and a fresh clone could not import pyro_vae.data)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(REPO)) for p in _package_files()]
    files += [str(p.relative_to(REPO)) for p in sorted((REPO / "tests").glob("*.py"))]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *files],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert ignored == []
