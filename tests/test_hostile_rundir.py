"""A run directory under attack: one writer at a time, files that stay true.

Runs killed before their first checkpoint start over; stray temporary files go; a
second writer (a real process) is refused by name; ``--out`` never overwrites files
that are not a run's; a resume that would make the files lie (fewer epochs, a cut or
foreign history, a copied-in checkpoint, data moved, replaced or given relative to
another directory) gets a one-line message or the right behaviour; unwritable or
full directories give one line, never a traceback.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae.cli import rundir, runlock
from pyro_vae.cli.config import FitConfig
from pyro_vae.cli.evaluate import main as eval_main
from pyro_vae.cli.fit import main
from pyro_vae.cli.run import run
from pyro_vae.training.checkpoint import load_checkpoint

TINY = ["--hidden", "32", "--latent-dim", "3", "--quiet", "--eval-k", "0"]


def _epochs(out):
    with open(out / "history.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def _one_line_error(err):
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-epoch run; tests copy it (``_copy``) before changing it."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main([*TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


def _copy(trained, where):
    shutil.copytree(trained, where)
    return where


def _npz(path, n=200, side=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, side, side)).astype(np.float32)
    np.savez(path, x_train=x[: n - 20], x_test=x[n - 20 :])
    return path


# -- runs that could not finish ---------------------------------------------------


def _never_checkpointed(out):
    """What a SIGKILL before the first checkpoint leaves: config.json, a header."""
    out.mkdir()
    cfg = FitConfig(hidden=(32,), latent_dim=3, quiet=True, eval_k=0, epochs=1)
    (out / "config.json").write_text(cfg.to_json() + "\n")
    (out / "history.csv").write_text(",".join(rundir.HISTORY_FIELDS) + "\n")
    return cfg


def test_a_run_killed_before_its_first_checkpoint_leads_somewhere(tmp_path, capsys):
    # --resume starts it from epoch 1 with its own config.json ...
    out = tmp_path / "killed"
    _never_checkpointed(out)
    assert rundir.resume_config(out)["latent_dim"] == 3  # what --resume continues
    assert main(["--resume", str(out)]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert load_checkpoint(out / "checkpoint.pt")["config"]["latent_dim"] == 3
    assert _epochs(out) == [1]
    # ... --out may reuse it: the directory holds no checkpoint to lose ...
    reused = tmp_path / "reused"
    cfg = _never_checkpointed(reused)
    flags = ["--hidden", "32", "--latent-dim", "3", "--quiet", "--eval-k", "0"]
    assert main([*flags, "--epochs", "1", "--out", str(reused)]) == 0
    assert _epochs(reused) == [1]
    # ... and from Python, resuming such a run starts it from epoch 1 too
    again = tmp_path / "api"
    _never_checkpointed(again)
    run(cfg, resume=again)
    assert load_checkpoint(again / "checkpoint.pt")["epoch"] == 1
    assert _epochs(again) == [1]


def test_stray_temporaries_of_a_killed_writer_are_removed(trained, tmp_path):
    out = _copy(trained, tmp_path / "r")
    strays = [".checkpoint.pt.k1ll3d.tmp", ".metrics.json.tmp", ".history.csv.tmp"]
    for name in strays:
        (out / name).write_bytes(b"half")
    assert main(["--resume", str(out), "--epochs", "3", "--quiet"]) == 0
    assert not [name for name in strays if (out / name).exists()]
    assert _epochs(out) == [1, 2, 3]


# -- one directory, one writer ------------------------------------------------------


def test_a_second_writer_is_refused_while_the_first_lives(trained, tmp_path, capsys):
    out = _copy(trained, tmp_path / "live")
    link = tmp_path / "link"
    link.symlink_to(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "pyro_vae.fit", "--resume", str(out)]
        + ["--epochs", "1000", "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = out / runlock.LOCK_NAME

    def holder():
        return lock.read_text().split()[:1] if lock.exists() else []

    try:
        deadline = time.time() + 300  # generous: a loaded 2-core machine
        while time.time() < deadline and holder() != [str(first.pid)]:
            assert first.poll() is None, first.communicate()[1]
            time.sleep(0.1)
        assert holder() == [str(first.pid)], "the first writer never took the lock"
        for argv in (
            ["--resume", str(out), "--epochs", "2000", "--quiet"],
            ["--resume", str(link), "--epochs", "2000", "--quiet"],  # same directory
            [*TINY, "--out", str(out)],
        ):
            assert main(argv) == 1
            line = _one_line_error(capsys.readouterr().err)
            assert f"in use by process {first.pid} (pyro_vae.fit" in line, line
        assert eval_main([str(out), "--k", "2", "--n", "4"]) == 1
        assert f"process {first.pid}" in _one_line_error(capsys.readouterr().err)
        (out / runlock.LOCK_NAME).unlink()  # deleting the lock file lets no one in
        assert main(["--resume", str(out), "--epochs", "2000", "--quiet"]) == 1
        assert "in use" in _one_line_error(capsys.readouterr().err)
    finally:
        first.send_signal(signal.SIGKILL)  # the OS frees its locks however it dies
        first.communicate(timeout=60)
    done = load_checkpoint(out / "checkpoint.pt")["epoch"]
    assert main(["--resume", str(out), "--epochs", str(done + 1), "--quiet"]) == 0
    assert _epochs(out) == list(range(1, done + 2))  # no duplicated rows


def test_out_never_overwrites_a_directory_that_is_not_a_run(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "config.json").write_text('{"name": "my web app"}')
    before = sorted(p.name for p in mine.iterdir())
    assert main([*TINY, "--epochs", "1", "--out", str(mine)]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "holds other files" in line and "notes.txt" in line
    assert sorted(p.name for p in mine.iterdir()) == before  # not even a lock file
    assert (mine / "config.json").read_text() == '{"name": "my web app"}'
    (mine / "notes.txt").unlink()  # only someone else's config.json: still refused
    assert main([*TINY, "--epochs", "1", "--out", str(mine)]) == 1
    assert "config.json" in _one_line_error(capsys.readouterr().err)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*TINY, "--epochs", "1", "--out", str(empty)]) == 0


# -- a run directory stays true ------------------------------------------------------


def test_resume_to_fewer_epochs_than_done_is_refused(trained, tmp_path, capsys):
    out = _copy(trained, tmp_path / "r")
    metrics = (out / "metrics.json").read_text()
    assert main(["--resume", str(out), "--epochs", "1", "--quiet"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "trained 2 epochs already" in line and "--epochs 2 or more" in line
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    assert (out / "metrics.json").read_text() == metrics
    assert _epochs(out) == [1, 2]


def test_a_history_line_cut_mid_write_is_dropped(trained, tmp_path, capsys):
    out = _copy(trained, tmp_path / "r")
    with open(out / "history.csv", "a") as f:
        f.write("3,-41.5,-4")  # killed while writing epoch 3's row
    assert main(["--resume", str(out), "--epochs", "3", "--quiet"]) == 0
    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(None not in r.values() for r in rows)
    # a broken row inside the file is named, not silently read
    text = (out / "history.csv").read_text().splitlines()
    text[1] = "1,oops"
    (out / "history.csv").write_text("\n".join(text) + "\n")
    assert main(["--resume", str(out), "--epochs", "4", "--quiet"]) == 1
    assert "line 2 of" in _one_line_error(capsys.readouterr().err)


def test_a_history_that_does_not_match_the_checkpoint_is_refused(
    trained, tmp_path, capsys
):
    out = _copy(trained, tmp_path / "r")
    lines = (out / "history.csv").read_text().splitlines()
    # two writers (before the lock) repeated a row
    (out / "history.csv").write_text("\n".join([*lines, lines[-1]]) + "\n")
    assert main(["--resume", str(out), "--epochs", "3", "--quiet"]) == 1
    assert "does not match" in _one_line_error(capsys.readouterr().err)


def test_the_settings_a_resume_may_change_are_the_fits():
    from pyro_vae.cli.fit import RESUMABLE

    assert {*RESUMABLE, "out"} == rundir.MAY_DIFFER


def test_a_checkpoint_copied_from_another_run_is_refused(trained, tmp_path, capsys):
    out = _copy(trained, tmp_path / "mine")
    other = tmp_path / "other"
    flags = ["--hidden", "16", "--latent-dim", "2", "--quiet", "--eval-k", "0"]
    assert main([*flags, "--epochs", "1", "--out", str(other)]) == 0
    config = (out / "config.json").read_text()
    shutil.copy(other / "checkpoint.pt", out / "checkpoint.pt")
    assert main(["--resume", str(out), "--epochs", "3", "--quiet"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "copied from another run" in line and "--latent-dim" in line
    assert (out / "config.json").read_text() == config  # no file was rewritten
    assert _epochs(out) == [1, 2]


def test_data_given_by_a_relative_path_are_found_from_anywhere(tmp_path, monkeypatch):
    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    _npz("data.npz")
    flags = [*TINY, "--dataset", "npz", "--data-path", "data.npz", "--epochs", "1"]
    assert main([*flags, "--out", "run"]) == 0
    saved = json.loads(Path("run/config.json").read_text())["data_path"]
    assert saved == str(tmp_path / "project" / "data.npz")
    monkeypatch.chdir(tmp_path / "elsewhere")
    run_dir = str(tmp_path / "project" / "run")
    assert eval_main([run_dir, "--k", "2", "--n", "4", "--device", "cpu"]) == 0
    assert main(["--resume", run_dir, "--epochs", "2", "--quiet"]) == 0


def test_data_replaced_by_data_of_another_shape_are_refused(tmp_path, capsys):
    data = _npz(tmp_path / "data.npz")
    out = tmp_path / "run"
    flags = [*TINY, "--dataset", "npz", "--data-path", str(data), "--epochs", "1"]
    assert main([*flags, "--out", str(out)]) == 0
    config = (out / "config.json").read_text()
    _npz(data, side=6)  # 6 x 6 now, trained on 8 x 8
    assert main(["--resume", str(out), "--epochs", "2", "--quiet"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "not those" in line and "(8, 8) then, (6, 6) now" in line
    assert eval_main([str(out), "--k", "2", "--n", "4"]) == 1
    assert "64 then, 36 now" in _one_line_error(capsys.readouterr().err)
    _npz(data, n=260)  # the same shape, more data: still not the run's data
    assert main(["--resume", str(out), "--epochs", "2", "--quiet"]) == 1
    assert "sizes" in _one_line_error(capsys.readouterr().err)
    assert (out / "config.json").read_text() == config
    assert _epochs(out) == [1]


# -- unwritable directories ----------------------------------------------------------


def _deny_writes_under(monkeypatch, root, code=errno.EACCES):
    """As if ``root`` were read-only (the tests run as root, so chmod cannot)."""
    real_open, real_mkstemp = os.open, __import__("tempfile").mkstemp
    root = os.path.realpath(root)

    def denied(path):
        return os.path.realpath(path).startswith(root)

    def fake_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and denied(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkstemp(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's name
        if dir is not None and denied(dir):
            raise OSError(code, os.strerror(code), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr("tempfile.mkstemp", fake_mkstemp)


def test_unwritable_directories_give_one_line(trained, tmp_path, monkeypatch, capsys):
    out = _copy(trained, tmp_path / "ro")
    fresh = tmp_path / "fresh"
    for path in (out, fresh):
        _deny_writes_under(monkeypatch, path)
    assert main([*TINY, "--epochs", "1", "--out", str(fresh)]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert str(fresh) in line and "Permission denied" in line
    assert main(["--resume", str(out), "--epochs", "3", "--quiet"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert str(out) in line and "writable" in line
    assert eval_main([str(out), "--k", "2", "--n", "4"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert str(out) in line and "writable" in line


def test_a_full_disk_while_checkpointing_gives_one_line(
    trained, tmp_path, monkeypatch, capsys
):
    out = _copy(trained, tmp_path / "full")
    before = (out / "checkpoint.pt").read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as torch gives it

    monkeypatch.setattr("pyro_vae.training.checkpoint.torch.save", no_space)
    assert main(["--resume", str(out), "--epochs", "3", "--quiet"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "checkpoint.pt" in line and "free space" in line and "--resume" in line
    assert (out / "checkpoint.pt").read_bytes() == before  # the last one is intact
    assert not list(out.glob(".*.tmp"))


# -- further attacks ---------------------------------------------------------------


def test_a_path_with_spaces_and_unicode_gives_commands_that_work(
    trained, tmp_path, capsys
):
    out = _copy(trained, tmp_path / "my runs" / "ü ñ 1")
    assert main([*TINY, "--epochs", "1", "--out", str(out)]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert f"--resume {shlex.quote(str(out))}," in line
    argv = shlex.split(line.split("continue it with ")[1].split(",")[0])
    assert main([*argv, "--epochs", "3", "--quiet"]) == 0
    assert _epochs(out) == [1, 2, 3]


def test_resume_given_the_checkpoint_file_names_the_directory(trained, capsys):
    assert main(["--resume", str(trained / "checkpoint.pt")]) in (1, 2)
    err = capsys.readouterr().err
    assert f"give the directory that holds it ({trained})" in err


def test_a_moved_run_resumes_and_its_config_says_where_it_is(trained, tmp_path):
    out = _copy(trained, tmp_path / "moved")
    assert json.loads((out / "config.json").read_text())["out"] == str(trained)
    assert main(["--resume", str(out), "--epochs", "3", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["out"] == str(out)
    assert load_checkpoint(out / "checkpoint.pt")["config"]["out"] == str(out)


def test_checkpoints_follow_the_umask_like_every_other_file(trained):
    mode = stat.S_IMODE((trained / "checkpoint.pt").stat().st_mode)
    assert mode == stat.S_IMODE((trained / "config.json").stat().st_mode)


def test_two_default_run_directories_of_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt, *a: "20240101-000000")
    cfg = FitConfig(hidden=(32,), latent_dim=3)
    with runlock.scope():
        first = rundir.create(cfg)
        second = rundir.create(cfg)
    assert first != second and second.name == "digits-20240101-000000-2"
    assert (first / "config.json").is_file() and (second / "config.json").is_file()


def test_locks_are_released_when_a_run_fails(trained, tmp_path, capsys):
    # an error inside the run must not leave this process holding the directory
    out = _copy(trained, tmp_path / "r")
    assert main(["--resume", str(out), "--epochs", "1", "--quiet"]) == 1
    capsys.readouterr()
    assert main(["--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pyro_vae.cli import runlock; "
            f"runlock.acquire({str(out)!r}); print('free')",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.stdout.strip() == "free", probe.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_a_full_disk_while_writing_history_gives_one_line(
    trained, tmp_path, monkeypatch, capsys
):
    out = _copy(trained, tmp_path / "full")

    def cut_row(where, stats):  # the disk fills up in the middle of a row
        with open(where / "history.csv", "a") as f:
            f.write(f"{stats.epoch},-4")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir, "append_history", cut_row)
    assert main(["--resume", str(out), "--epochs", "3", "--quiet"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert str(out) in line and "No space left" in line and "--resume" in line
    monkeypatch.undo()
    assert main(["--resume", str(out), "--epochs", "3", "--quiet"]) == 0
    assert _epochs(out) == [1, 2, 3]


def test_out_paths_that_cannot_be_a_directory_give_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out, words in (
        (tmp_path / "file", "is a file"),
        (tmp_path / "dangling", "which does not exist"),
        (tmp_path / ("a" * 300), "File name too long"),
    ):
        assert main([*TINY, "--epochs", "1", "--out", str(out)]) == 1
        assert words in _one_line_error(capsys.readouterr().err)
