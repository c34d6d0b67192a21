"""The teaching notebooks run top to bottom and show what their text says they show.

Each notebook ends with a cell that prints ``RESULT {json}``: the numbers it computed.
The execution test runs the notebook in a fresh kernel (nbclient), fails on any cell
error, then checks those numbers. The thresholds leave room for run-to-run noise; the
measured values (seed 0, CPU) are in the comments.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
EXPECTED = {
    "01_vae_in_pyro.ipynb",
    "02_swap_priors_and_likelihoods.ipynb",
    "03_infovae_vs_elbo.ipynb",
    "04_evaluating_log_likelihood.ipynb",
}


def _execute(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    return nb


def _errors(nb: nbformat.NotebookNode) -> list[str]:
    return [
        f"cell {i}: {out.get('ename')}: {out.get('evalue')}"
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.output_type == "error"
    ]


def _result(nb: nbformat.NotebookNode) -> dict:
    last = [cell for cell in nb.cells if cell.cell_type == "code"][-1]
    text = "".join(
        out.get("text", "") for out in last.outputs if out.output_type == "stream"
    )
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, f"the last cell should print one RESULT line:\n{text}"
    return json.loads(lines[0][len("RESULT ") :])


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def check_01(r: dict) -> None:
    # Training raised the test ELBO (measured: -45.4 untrained, -25.0 trained).
    assert r["trained_test_elbo"] > r["untrained_test_elbo"] + 5
    assert r["test_log_px"] + 3 * r["test_log_px_se"] >= r["trained_test_elbo"]
    # Trace_ELBO, TraceMeanField_ELBO and E log p(x|z) - KL by hand are one ELBO
    # (measured: equal to 0.003 nats with 2000 particles).
    by_hand = r["by_hand_elbo_untrained"]
    assert abs(r["trace_elbo_untrained"] - by_hand) < 0.1
    assert abs(r["meanfield_elbo_untrained"] - by_hand) < 0.1
    # The score-function gradient is noisier than the pathwise one (measured 4.4x).
    assert r["score_over_pathwise_variance"] > 2
    # sigma = 1 on [0, 1] pixels collapses the code; sigma = 0.1 keeps it (0 vs 8).
    decoders = r["decoders"]
    assert (
        decoders["Gaussian σ=1 (grey)"]["active_units"]
        < decoders["Gaussian σ=0.1 (grey)"]["active_units"]
    )
    assert decoders["Bernoulli (binary)"]["active_units"] >= 1


def check_02(r: dict) -> None:
    names = [row["model"] for row in r["rows"]]
    assert names == [
        "default",
        "Laplace prior",
        "robust likelihood",
        "yours (both)",
        "VampPrior",
    ]
    for row in r["rows"]:
        assert _finite(row["elbo"], row["log_px"], row["elbo_se"], row["log_px_se"])
        # log p-hat sits above the ELBO (measured: by 0.36 to 0.68 nats)
        se = math.hypot(row["elbo_se"], row["log_px_se"])
        assert row["log_px"] >= row["elbo"] - 3 * se, row
        assert 0 <= row["khat_above_0.7"] <= 1


def check_03(r: dict) -> None:
    elbo, info = r["toy"]["ELBO"], r["toy"]["InfoVAE (α=0, λ=100)"]
    # Measured: aggregate KL to the prior 0.265 nats (ELBO) against 0.003 (InfoVAE);
    # posteriors 4.7 against 0.2 sds apart. tests/test_experiments.py saw the same
    # ordering by a factor 5 or more on seeds 0-2 at these settings.
    assert elbo["aggregate_kl_to_prior"] > 5 * info["aggregate_kl_to_prior"]
    assert elbo["separation_in_sds"] > info["separation_in_sds"]
    assert elbo["elbo"] > info["elbo"]  # the ELBO prefers its own solution
    rows = r["sizes"]
    assert len(rows) == 6
    for row in rows:
        assert _finite(row["logdet_train"], row["logdet_test"], row["mi_train"])
    smallest = min(row["n_train"] for row in rows)
    at = {row["objective"]: row for row in rows if row["n_train"] == smallest}
    e, i = at["ELBO"], at["InfoVAE (α=0, λ=100)"]
    # At n = 100 the ELBO memorizes (measured: I(x;z) 4.49 of log 100 = 4.61, against
    # 2.92; train-test ELBO gap 10.4 against 3.3 nats).
    assert e["mi_train"] > i["mi_train"]
    assert e["train_elbo"] - e["test_elbo"] > i["train_elbo"] - i["test_elbo"]


def check_04(r: dict) -> None:
    o = r["oracle"]
    # Measured: log p-hat - exact = -0.0016 +- 0.0015; gap 0.9800 +- 0.0028 against
    # the closed-form KL 0.9800.
    assert abs(o["log_px_minus_exact"]) < 5 * o["log_px_se"], o
    assert abs(o["gap"] - o["kl_exact"]) < 5 * o["gap_se"], o
    assert o["kl_exact"] > 0.1
    exact = r["oracle_exact_guide"]
    assert abs(exact["gap"]) < 1e-8 and abs(exact["log_px_minus_exact"]) < 1e-8
    by_scale = {row["scale"]: row for row in r["oracle_sweep"]}
    # Too narrow a proposal: heavy tails, flagged by k-hat (measured mean 0.77) ...
    assert by_scale[0.5]["khat_mean"] > 0.5
    # ... wider ones are fine (measured mean k-hat below 0, none above 0.7).
    for scale in (1.4, 2.0):
        assert by_scale[scale]["khat_above_0.7"] == 0
        row = by_scale[scale]
        assert abs(row["gap"] - row["kl_exact"]) < 5 * row["gap_se"], row
    # The VAE's ladder rises: ELBO <= IWAE_10 <= IWAE_100 <= log p-hat.
    s = r["vae"]["summary"]
    chain = [s["elbo"]] + [s["iwae"][k] for k in ("10", "100")] + [s["log_px"]]
    for a, b in zip(chain[:-1], chain[1:], strict=True):
        assert a["mean"] <= b["mean"] + 3 * math.hypot(a["se"], b["se"])
    # As generators the VAE beats the AE (measured log p-hat -23.7 against -90.1,
    # k-hat > 0.7 for 1.4% against 100% of test data).
    vae, ae = r["generators"]["VAE (ELBO)"], r["generators"]["AE"]
    assert vae["log_px"] > ae["log_px"]
    assert ae["khat_above_0.7"] > vae["khat_above_0.7"]


CHECKS = {
    "01_vae_in_pyro.ipynb": check_01,
    "02_swap_priors_and_likelihoods.ipynb": check_02,
    "03_infovae_vs_elbo.ipynb": check_03,
    "04_evaluating_log_likelihood.ipynb": check_04,
}


def test_the_notebooks_are_there():
    assert EXPECTED <= {p.name for p in PATHS}


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "a notebook without code"
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"code cell {i} has stored outputs"
        assert cell.execution_count is None, f"code cell {i} has an execution count"
    # A knob near the top scales the notebook up.
    assert "SCALE = 1" in code[0].source


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_runs_and_shows_its_result(path, monkeypatch):
    # No timing assertion: run time depends on the machine's load. The 3-minute
    # budget per notebook is measured and reported, not tested (15-27 s each on a
    # quiet 2-core CPU).
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the kernel inherits it
    nb = _execute(path)
    assert not _errors(nb), _errors(nb)
    check = CHECKS.get(path.name)
    if check is not None:
        check(_result(nb))
