"""The README's worked example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_custom_prior_and_likelihood_example_runs(capsys):
    text = README.read_text()
    section = text[text.index("Your own prior and likelihood") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace("epochs=10", "epochs=2").replace("k=1000", "k=50")
    torch.set_default_dtype(torch.float32)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'mean'" in printed and "'se'" in printed


def test_ci_installs_exactly_as_the_readme_says():
    """.ci/run installs as the README's test command says and runs both commands."""
    text = README.read_text()
    section = text[text.index("## Set-up") : text.index("## Quickstart")]
    commands = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert len(commands) == 2
    ci = (README.parent / ".ci" / "run").read_text()
    (main_install, main_run), (test_install, test_run) = (
        command.split(" && ") for command in commands
    )
    assert test_install.replace("pip install ", "pip install -q ") in ci
    assert main_install == test_install.replace('".[dev]"', ".")
    ci_lines = [line.split() for line in ci.splitlines()]
    for run in (test_run, main_run):  # a line of .ci/run starts with the command
        assert any(line[: len(run.split())] == run.split() for line in ci_lines), run
