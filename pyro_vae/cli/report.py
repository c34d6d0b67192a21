"""``python -m pyro_vae.report RUN_DIR``: one Markdown file that tells a run's story.

``report.md`` holds the config, a metrics table (ELBO per split, the test log p̂(x) ±
Monte Carlo se, the gap, the k̂ summary, the AIS estimate, IS − AIS and the BDMC
bounds when they ran, active units, MMD to the prior), the warnings of the AIS check,
and every figure in ``figures/`` inline. It is rebuilt from the files of the run
directory alone (``config.json``, ``metrics.json``, ``evaluation.json`` when present,
``figures/*.png``), so it can be made again at any time; ``fit`` writes it at the end.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pyro_vae.errors import PyroVAEError
from pyro_vae.files import atomic_write_text

__all__ = ["FIGURE_ORDER", "build_report", "main"]

FIGURE_ORDER = (
    ("elbo", "Training curve: train and validation ELBO per epoch"),
    ("reconstructions", "Reconstructions: test inputs and E[x|z], z ~ q(z|x)"),
    ("samples", "Prior samples: E[x|z], z ~ p(z)"),
    ("manifold", "2-D latent manifold: a grid of prior quantiles decoded"),
    ("latent", "Latent means of the test data, coloured by label"),
    ("denoising", "Denoising: noisy inputs and their reconstructions"),
    ("interpolation", "Interpolation between test images in latent space"),
    ("iwae_vs_k", "IWAE_k against k: from the ELBO to log p̂(x)"),
    ("khat", "PSIS k̂ of each test datum's importance weights"),
    ("is_vs_ais", "IS − AIS log p̂(x) per datum against k̂"),
    ("bdmc", "BDMC: AIS's lower and upper bounds on simulated data against steps"),
)


def _read(path: Path) -> dict:
    """The JSON object in ``path``; {} when it is missing. One-line errors."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PyroVAEError(
            f"{path} is not valid JSON ({err}); re-run the step that wrote it"
        ) from None
    except OSError as err:  # a directory, no permission
        raise PyroVAEError(
            f"cannot read {path} ({type(err).__name__}: {err.strerror or err})"
        ) from None
    if not isinstance(data, dict):
        raise PyroVAEError(
            f"{path} holds a JSON {type(data).__name__}, not an object of named "
            "values; re-run the step that wrote it"
        )
    return data


def _fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{value!r} is not a number")
    return f"{value:.{digits}f}"


def _rows(path: Path, make: Callable[[], list[str]]) -> list[str]:
    """``make()``, or a one-line error naming ``path`` when its values are garbled."""
    try:
        return make()
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        what = f"no {err}" if isinstance(err, KeyError) else str(err)
        raise PyroVAEError(
            f"{path} is malformed ({what}); re-run the step that wrote it"
        ) from None


def _metrics_rows(metrics: dict, evaluation: dict, run_dir: Path) -> list[str]:
    rows = ["| quantity | value | notes |", "|---|---|---|"]
    rows += _rows(run_dir / "metrics.json", lambda: _elbo_rows(metrics))
    rows += _rows(run_dir / "evaluation.json", lambda: _evaluation_rows(evaluation))
    latents_file = "evaluation.json" if evaluation.get("latents") else "metrics.json"
    latents = evaluation.get("latents") or metrics.get("test_latents")
    rows += _rows(run_dir / latents_file, lambda: _latent_rows(latents))
    return rows


def _elbo_rows(metrics: dict) -> list[str]:
    rows = []
    for split in ("train", "valid", "test"):
        if f"{split}_elbo" in metrics:
            rows.append(
                f"| ELBO, {split} | {_fmt(metrics[f'{split}_elbo'])} | "
                f"{metrics.get('estimator', '')} |"
            )
    return rows


def _evaluation_rows(evaluation: dict) -> list[str]:
    rows = []
    if "log_px" in evaluation:  # importance sampling
        lp, gap, khat = evaluation["log_px"], evaluation["gap"], evaluation["khat"]
        rows += [
            f"| log p̂(x), {evaluation['split']} | {_fmt(lp['mean'])} ± {_fmt(lp['se'])}"
            f" | importance sampling, K = {evaluation['k']}, n = {evaluation['n']}; "
            "± Monte Carlo se |",
            f"| gap log p̂(x) − ELBO | {_fmt(gap['mean'])} ± {_fmt(gap['se'])} | "
            "estimates E KL(q(z|x) ‖ p(z|x)) |",
            f"| k̂ > 0.7 | {100 * khat['fraction_above_0.7']:.1f}% of data | "
            f"mean {_fmt(khat['mean'])}, max {_fmt(khat['max'])}; above 0.7 the "
            "estimate is unreliable |",
        ]
        for k, v in evaluation["iwae"].items():
            if 1 < int(k) < evaluation["k"]:
                rows.append(f"| IWAE_{k} | {_fmt(v['mean'])} ± {_fmt(v['se'])} | |")
    if "ais" in evaluation:
        rows += _ais_rows(evaluation)
    if "bdmc" in evaluation:
        rows += _bdmc_rows(evaluation["bdmc"])
    return rows


def _ais_rows(evaluation: dict) -> list[str]:
    ais = evaluation["ais"]
    lp, acc = ais["log_px"], ais["acceptance"]
    rows = [
        f"| log p̂_AIS(x), {evaluation['split']} | {_fmt(lp['mean'])} ± "
        f"{_fmt(lp['se'])} | AIS, {ais['steps']} steps, {ais['chains']} chains, "
        f"{ais['leapfrog']} leapfrog, n = {ais['n']}; acceptance {_fmt(acc['mean'], 2)}"
        f" (min {_fmt(acc['min'], 2)}); {_fmt(ais['seconds'], 1)} s |"
    ]
    if "is_minus_ais" in evaluation:
        d = evaluation["is_minus_ais"]
        above, below = d["khat_above_0.7"], d["khat_at_most_0.7"]
        rows.append(
            f"| IS − AIS | {_fmt(d['mean'])} ± {_fmt(d['se'])} | per datum: mean "
            f"{_fmt(above['mean'])} where k̂ > 0.7 ({above['n']} data), "
            f"{_fmt(below['mean'])} where k̂ ≤ 0.7 ({below['n']}); corr(k̂, IS − "
            f"AIS) {_fmt(d['correlation_with_khat'], 2)} |"
        )
    return rows


def _bdmc_rows(bdmc: dict) -> list[str]:
    rows = []
    for r in bdmc["rows"]:
        lo, up, gap = r["lower"], r["upper"], r["gap"]
        rows.append(
            f"| BDMC, {r['steps']} steps | {_fmt(lo['mean'])} ≤ log p(x) ≤ "
            f"{_fmt(up['mean'])} | gap {_fmt(gap['mean'])} ± {_fmt(gap['se'])} on "
            f"{bdmc['n']} simulated data, {bdmc['chains']} chains; acceptance "
            f"{_fmt(r['acceptance'], 2)} |"
        )
    return rows


def _latent_rows(latents: dict | None) -> list[str]:
    rows = []
    if latents:
        active = latents["active_units"]
        rows += [
            f"| active units | {'–' if active is None else active} of "
            f"{latents['latent_dim']} | Cov_x E_q[z_d] > 0.01 |",
            f"| MMD²(q(z), p(z)) | {_fmt(latents['mmd'], 4)} | RBF kernel, c = 2d |",
            f"| log det Cov[q(z)] | {_fmt(latents['log_det_cov'])} | 0 for N(0, I) |",
            f"| I(x; z) | {_fmt(latents['mutual_information'])} | nats, at most "
            f"{_fmt(latents['mutual_information_max'], 2)} |",
        ]
    return rows


def build_report(run_dir: str | os.PathLike) -> Path:
    """Write ``RUN_DIR/report.md`` from the run's files; return its path."""
    run_dir = Path(run_dir)
    config = _read(run_dir / "config.json")
    if not config:
        raise PyroVAEError(
            f"{run_dir} has no config.json: give a run directory written by "
            "python -m pyro_vae.fit"
        )
    metrics, evaluation = (
        _read(run_dir / "metrics.json"),
        _read(run_dir / "evaluation.json"),
    )
    lines = [
        *_summary_lines(run_dir, config, metrics, evaluation),
        *_warning_lines(run_dir, evaluation),
        *_notes_lines(run_dir, metrics),
        *_figure_lines(run_dir),
        *_config_lines(config),
    ]
    path = run_dir / "report.md"
    try:
        atomic_write_text(path, "\n".join(lines))
    except OSError as err:
        raise PyroVAEError(
            f"cannot write {path} ({type(err).__name__}: {err.strerror or err}); "
            "make the run directory writable, or copy it somewhere writable"
        ) from None
    return path


def _summary_lines(
    run_dir: Path, config: dict, metrics: dict, evaluation: dict
) -> list[str]:
    """The title, the run's parts in one line, and the table of metrics."""
    units = "nats per datum, higher is better"
    return [
        f"# Run report: {run_dir.name}",
        "",
        f"{config.get('dataset')} · {config.get('likelihood')} likelihood · "
        f"{config.get('prior')} prior · {config.get('guide')} guide · "
        f"{config.get('arch', 'mlp')} networks · latent {config.get('latent_dim')} · "
        f"loss {config.get('loss', 'elbo')}",
        "",
        *_rows(
            run_dir / "metrics.json",
            lambda: [
                f"Binarization: {metrics.get('binarization', 'n/a')}. Wall time "
                f"{_fmt(metrics.get('wall_seconds'), 1)} s on "
                f"{metrics.get('device', 'n/a')}."
            ],
        ),
        "",
        f"## Metrics ({units})",
        "",
        *_metrics_rows(metrics, evaluation, run_dir),
        "",
    ]


def _warning_lines(run_dir: Path, evaluation: dict) -> list[str]:
    """The loud check of the AIS evaluation (``ais_warnings``); none if it passed."""
    warnings = evaluation.get("ais_warnings") or []
    if not isinstance(warnings, list):
        raise PyroVAEError(
            f"{run_dir / 'evaluation.json'} is malformed (its ais_warnings are not a "
            "list); re-run the step that wrote it"
        )
    if not warnings:
        return []
    return ["## Warnings", "", *(f"- **WARNING:** {w}" for w in warnings), ""]


def _notes_lines(run_dir: Path, metrics: dict) -> list[str]:
    """What the end of the run skipped or could not do, and why; none if nothing."""
    notes = metrics.get("notes") or []
    if not isinstance(notes, list):
        raise PyroVAEError(
            f"{run_dir / 'metrics.json'} is malformed (its notes are not a list); "
            "re-run the step that wrote it"
        )
    if not notes:
        return []
    return ["## Notes", "", *(f"- {note}" for note in notes), ""]


def _figure_lines(run_dir: Path) -> list[str]:
    """Each figure the run directory holds, in :data:`FIGURE_ORDER`, captioned."""
    lines = ["## Figures", ""]
    for name, caption in FIGURE_ORDER:
        if (run_dir / "figures" / f"{name}.png").is_file():
            lines += [f"### {caption}", "", f"![{caption}](figures/{name}.png)", ""]
    return lines


def _config_lines(config: dict) -> list[str]:
    """The run's config as a JSON block."""
    return [
        "## Config",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True),
        "```",
        "",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild the report of the run directory given as the only argument."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m pyro_vae.report RUN_DIR", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        print(build_report(argv[0]))
    except PyroVAEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
