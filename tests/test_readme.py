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
