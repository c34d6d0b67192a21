r"""AIS with HMC: its speed against hand-written torch, and its quality against IS.

``speed``: the estimating pass of :func:`pyro_vae.evaluate.annealing.anneal` with the
Pyro-trace potential of :mod:`pyro_vae.evaluate.ais` against
:func:`pyro_vae.evaluate.reference_ais.mlp_vae_ais` (the same MLP VAE written out in
torch), on the same binarized test images, networks, chains, leapfrog steps, frozen
step sizes (from one short pilot pass), starting points and counter keys, both in
float32 with the same threads; interleaved repeats, median. It reports seconds per
AIS transition (the pass's time over T - 1 transitions), the ratio, and how many
chains' log-weights agree between the two. Target (issue 16): ratio <= 1.3.

``quality``: for each run directory written by ``python -m pyro_vae.fit``, on its
first ``--n`` test images (binarized as the run was): importance sampling with K
draws (:func:`pyro_vae.evaluate.log_marginal`, with k̂), AIS at each ``--ais-steps``
(:func:`pyro_vae.evaluate.ais.ais_log_marginal`) with IS - AIS per datum, and the
BDMC sandwich (:func:`pyro_vae.evaluate.bdmc.bdmc`) on ``--bdmc-n`` data simulated
from the model, with the gap per steps. Target (issue 16): BDMC gap <= 0.1 nats at
1000 steps on the MNIST VAE. ``--time-budget`` skips a row whose predicted time
(from the previous row's rate) exceeds what is left.

    python benchmarks/bench_ais.py speed --n 100 --steps 50 --repeats 3
    python benchmarks/bench_ais.py quality --run runs/mnist --run runs/fashion \
        --n 1000 --is-k 5000 --ais-steps 100,1000,10000 --time-budget 20000

References: Neal (2001); Grosse, Ghahramani & Adams (2015), arXiv:1511.02543; Wu,
Burda, Salakhutdinov & Grosse (2017), ICLR.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import pyro
import torch

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig, resolve_device
from pyro_vae.cli.loading import load, load_run_data
from pyro_vae.cli.rundir import binarization_note
from pyro_vae.data import evaluation_split
from pyro_vae.data.sources import load_dataset
from pyro_vae.evaluate import KHAT_UNRELIABLE, log_marginal
from pyro_vae.evaluate.ais import (
    ESTIMATE,
    PILOT,
    _eval_mode,
    _Target,
    ais_log_marginal,
)
from pyro_vae.evaluate.annealing import Noise, anneal, betas, pilot_step_sizes
from pyro_vae.evaluate.bdmc import bdmc
from pyro_vae.evaluate.reference_ais import mlp_vae_ais
from pyro_vae.rng import datum_keys

CASES = {  # name: (dataset, latent_dim, hidden, activation), as bench_evaluate.py
    "digits 64-400-10": ("digits", 10, (400,), "relu"),
    "fashion-mnist 784-400-50": ("fashion-mnist", 50, (400,), "relu"),
    # Burda et al.'s MNIST networks (the MNIST VAE of the quality table), on
    # Fashion-MNIST images of the same size, which CI and this machine have
    "burda 784-200-200-50 tanh": ("fashion-mnist", 50, (200, 200), "tanh"),
}
FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- speed ------------------------------------------------------------------------


def speed_case(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Time both estimating passes on one case; seconds per transition and ratio."""
    dataset, latent, hidden, activation = CASES[name]
    splits = load_dataset(dataset, data_dir=FASHION_DIR)
    gen = torch.Generator().manual_seed(0)
    x = torch.bernoulli(splits.test[: args.n], generator=gen).to(device)
    pyro.set_rng_seed(0)
    cfg = FitConfig(
        dataset=dataset, latent_dim=latent, hidden=hidden, activation=activation
    )
    model, guide = build_model_and_guide(cfg, x.shape[1])
    model, guide = model.to(device).eval(), guide.to(device).eval()
    index = torch.arange(len(x), device=device)
    keys, seed = datum_keys(args.seed, index), args.seed
    beta = betas(args.steps, args.schedule)
    target = _Target(model, guide, "guide")
    target.validate(x)
    with _eval_mode(model, guide), pyro.validation_enabled(False):
        densities = target.densities(x, args.chains)
        sizes = pilot_step_sizes(
            densities,
            target.initial(x, args.chains, seed, index, stream=PILOT),
            betas(args.pilot_steps, args.schedule),
            args.leapfrog,
            Noise(keys, PILOT),
            initial=0.05,
            target_accept=0.65,
            bins=max(1, min(50, args.pilot_steps // 4)),
        )
        u0 = target.initial(x, args.chains, seed, index, stream=ESTIMATE)
        eps = sizes.log_eps.exp()
        out = {}

        def ours() -> None:
            run = anneal(
                densities, u0, beta, sizes, args.leapfrog, Noise(keys, ESTIMATE)
            )
            out["ours"], out["acceptance"] = run.log_weights, run.acceptance

        def ref() -> None:
            out["ref"] = mlp_vae_ais(
                guide.encoder, model.decoder, x,
                steps=args.steps, leapfrog=args.leapfrog, step_sizes=eps, u0=u0,
                keys=keys, stream=ESTIMATE, scale_floor=guide.scale_floor,
                schedule=args.schedule,
            )  # fmt: skip

        times = {"ours": [], "ref": []}
        for fn in (ours, ref):  # warm-up
            fn()
        for _ in range(args.repeats):  # interleaved: load hits both alike
            for key, fn in (("ours", ours), ("ref", ref)):
                _sync(device)
                begin = time.perf_counter()
                fn()
                _sync(device)
                times[key].append(time.perf_counter() - begin)
    diff = (out["ours"] - out["ref"]).abs().cpu()
    agree = diff <= 1e-3 * (1 + out["ref"].abs().cpu())
    transitions = max(1, args.steps - 1)
    t_ours, t_ref = statistics.median(times["ours"]), statistics.median(times["ref"])
    return {
        "case": name,
        "n": len(x),
        "chains": args.chains,
        "leapfrog": args.leapfrog,
        "steps": args.steps,
        "pilot_steps": args.pilot_steps,
        "schedule": args.schedule,
        "pyro_vae_seconds_per_transition": t_ours / transitions,
        "reference_seconds_per_transition": t_ref / transitions,
        "ratio": t_ours / t_ref,
        "acceptance": out["acceptance"].mean().item(),
        "fraction_of_chains_agreeing": agree.double().mean().item(),
        "max_abs_log_weight_difference": diff.max().item(),
        "all_pyro_vae_seconds": times["ours"],
        "all_reference_seconds": times["ref"],
    }


def run_speed(args: argparse.Namespace, device: torch.device) -> dict:
    rows = [speed_case(name, args, device) for name in args.cases]
    print(
        f"{'case':<28}{'n':>5}{'C':>4}{'L':>4}{'T':>6}{'pyro_vae ms/step':>18}"
        f"{'ref ms/step':>13}{'ratio':>8}{'agree':>7}{'accept':>8}"
    )
    for r in rows:
        print(
            f"{r['case']:<28}{r['n']:>5}{r['chains']:>4}{r['leapfrog']:>4}"
            f"{r['steps']:>6}{1e3 * r['pyro_vae_seconds_per_transition']:>18.2f}"
            f"{1e3 * r['reference_seconds_per_transition']:>13.2f}{r['ratio']:>8.3f}"
            f"{r['fraction_of_chains_agreeing']:>7.2f}{r['acceptance']:>8.2f}"
        )
    return {"target": "ratio <= 1.3 (seconds per AIS transition)", "rows": rows}


# --- quality ----------------------------------------------------------------------


def _mean_se(v: torch.Tensor) -> dict[str, float]:
    n = len(v)
    return {
        "mean": v.mean().item() if n else math.nan,
        "se": v.std().item() / math.sqrt(n) if n > 1 else math.nan,
    }


class Budget:
    """Skips a row whose predicted seconds exceed what is left of ``--time-budget``."""

    def __init__(self, seconds: float | None) -> None:
        self.left, self.rate = seconds, {}

    def skip(self, kind: str, work: float) -> str | None:
        if self.left is None:
            return None
        if self.left <= 0:
            return "the time budget is spent"
        if kind not in self.rate:
            return None
        guess = self.rate[kind] * work
        if guess <= self.left:
            return None
        return f"predicted {guess:.0f} s > {max(self.left, 0):.0f} s left of the budget"

    def spent(self, kind: str, work: float, seconds: float) -> None:
        self.rate[kind] = seconds / work
        if self.left is not None:
            self.left -= seconds


def _pilot(steps: int) -> int:
    return min(steps, 200)  # ais_log_marginal's and bdmc's default


def quality_run(
    run_dir: str, args: argparse.Namespace, device: torch.device, budget: Budget
) -> dict:
    """IS, AIS per steps and BDMC per steps on one run directory."""
    model, guide, cfg = load(run_dir, device)
    binarize = cfg.resolved_binarize()
    x = evaluation_split(load_run_data(cfg, device), "test", binarize)[: args.n]
    common = {"chains": args.chains, "leapfrog": args.leapfrog, "seed": args.seed}
    begin = time.perf_counter()
    is_ = log_marginal(model, guide, x, args.is_k, seed=args.seed)
    budget.spent("is", 1.0, time.perf_counter() - begin)
    unreliable = is_.khat > KHAT_UNRELIABLE
    rows = [
        {
            "estimator": "IS",
            "k": args.is_k,
            "log_px": is_.summary()["log_px"],
            "fraction_khat_above_0.7": unreliable.double().mean().item(),
            "seconds": is_.seconds,
        }
    ]
    for steps in args.ais_steps:
        work = len(x) * (steps + _pilot(steps))
        reason = budget.skip("ais", work)
        if reason:
            rows.append({"estimator": "AIS", "steps": steps, "skipped": reason})
            continue
        ais = ais_log_marginal(model, guide, x, steps=steps, **common)
        budget.spent("ais", work, ais.seconds)
        summary = ais.summary()
        diff = is_.log_px - ais.log_px
        rows.append(
            {
                "estimator": "AIS",
                **ais.settings(),
                "log_px": summary["log_px"],
                "is_minus_ais": _mean_se(diff),
                "is_minus_ais_where_khat_above_0.7": _mean_se(diff[unreliable]),
                "acceptance": summary["acceptance"],
                "step_size_at_beta_1": summary["step_size_at_beta_1"],
                "seconds": ais.seconds,
            }
        )
    sandwich = []
    for steps in args.bdmc_steps:
        work = args.bdmc_n * (2 * steps + _pilot(steps))
        reason = budget.skip("bdmc", work)
        if reason:
            sandwich.append({"steps": steps, "skipped": reason})
            continue
        result = bdmc(model, guide, args.bdmc_n, steps=[steps], device=device, **common)
        (row,) = result.summary()["rows"]
        budget.spent("bdmc", work, row["seconds"])
        sandwich.append(row)
    return {
        "run": str(run_dir),
        "dataset": cfg.dataset,
        "binarize": binarize,
        "binarization": binarization_note(binarize),
        "n": len(x),
        "split": "test (first n)",
        "rows": rows,
        "bdmc": {
            "n": args.bdmc_n,
            "data": "simulated from the model: z ~ p(z), x ~ p(x | z)",
            "rows": sandwich,
        },
    }


def _pm(entry: dict) -> str:
    return f"{entry['mean']:.2f} ± {entry['se']:.2f}"


def quality_table(runs: list[dict]) -> str:
    """Markdown tables: estimators per run, then the BDMC sandwich per run."""
    lines = [
        "| run | estimator | log p̂(x) ± se | IS − AIS | IS − AIS (k̂ > 0.7) "
        "| k̂ > 0.7 | acceptance | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        name = f"{run['dataset']} ({Path(run['run']).name})"
        for r in run["rows"]:
            if r["estimator"] == "IS":
                lines.append(
                    f"| {name} | IS, K = {r['k']} | {_pm(r['log_px'])} | | "
                    f"| {r['fraction_khat_above_0.7']:.0%} | | {r['seconds']:.1f} |"
                )
            elif "skipped" in r:
                lines.append(
                    f"| {name} | AIS, T = {r['steps']} | skipped: {r['skipped']} "
                    "| | | | | |"
                )
            else:
                what = f"AIS, T = {r['steps']}, C = {r['chains']}, L = {r['leapfrog']}"
                lines.append(
                    f"| {name} | {what} | {_pm(r['log_px'])} "
                    f"| {_pm(r['is_minus_ais'])} "
                    f"| {_pm(r['is_minus_ais_where_khat_above_0.7'])} | "
                    f"| {r['acceptance']['mean']:.2f} | {r['seconds']:.1f} |"
                )
    lines += [
        "",
        "| run | BDMC steps | lower ± se | upper ± se | gap ± se | acceptance "
        "| seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        name = f"{run['dataset']} ({Path(run['run']).name}), n = {run['bdmc']['n']}"
        for r in run["bdmc"]["rows"]:
            if "skipped" in r:
                lines.append(
                    f"| {name} | {r['steps']} | skipped: {r['skipped']} | | | | |"
                )
                continue
            lines.append(
                f"| {name} | {r['steps']} | {_pm(r['lower'])} | {_pm(r['upper'])} "
                f"| {_pm(r['gap'])} | {r['acceptance']:.2f} | {r['seconds']:.1f} |"
            )
    return "\n".join(lines)


def run_quality(args: argparse.Namespace, device: torch.device) -> dict:
    budget = Budget(args.time_budget)
    runs = [quality_run(run, args, device, budget) for run in args.run]
    table = quality_table(runs)
    print(table)
    settings = {
        "estimators": {
            "IS": "pyro_vae.evaluate.log_marginal (PSIS k̂ on)",
            "AIS": "pyro_vae.evaluate.ais.ais_log_marginal, start=guide",
            "BDMC": "pyro_vae.evaluate.bdmc.bdmc, start=guide",
        },
        "is_k": args.is_k,
        "ais_steps": args.ais_steps,
        "bdmc_steps": args.bdmc_steps,
        "bdmc_n": args.bdmc_n,
        "chains": args.chains,
        "leapfrog": args.leapfrog,
        "schedule": "sigmoid",
        "pilot_steps": "min(steps, 200)",
        "n": args.n,
        "seed": args.seed,
        "time_budget": args.time_budget,
    }
    return {
        "target": "BDMC gap <= 0.1 nats at 1000 steps on the MNIST VAE",
        "settings": settings,
        "runs": runs,
        "table": table,
    }


# --- command line -----------------------------------------------------------------


def _steps_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"steps must each be >= 2, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--leapfrog", type=int, default=10)
    parser.add_argument("--json", default="benchmarks/results/bench_ais.json")
    sub = parser.add_subparsers(dest="part", required=True)
    speed = sub.add_parser("speed", help="Pyro-trace AIS vs hand-written torch")
    speed.add_argument("--cases", nargs="*", default=list(CASES))
    speed.add_argument("--n", type=int, default=100)
    speed.add_argument("--steps", type=int, default=50)
    speed.add_argument("--pilot-steps", type=int, default=20)
    speed.add_argument("--schedule", default="sigmoid")
    speed.add_argument("--repeats", type=int, default=3)
    quality = sub.add_parser("quality", help="IS, AIS and BDMC on trained runs")
    quality.add_argument("--run", action="append", required=True, help="run dir")
    quality.add_argument("--n", type=int, default=1000)
    quality.add_argument("--is-k", type=int, default=5000)
    quality.add_argument("--ais-steps", type=_steps_list, default=[100, 1000])
    quality.add_argument("--bdmc-steps", type=_steps_list, default=[100, 1000])
    quality.add_argument("--bdmc-n", type=int, default=20)
    quality.add_argument(
        "--time-budget", type=float, default=None, help="seconds; skip rows past it"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    device = resolve_device(args.device)
    result = (run_speed if args.part == "speed" else run_quality)(args, device)
    meta = {
        "part": args.part,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
    }
    path = Path(args.json)  # one file; each part replaces its own entry only
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved[args.part] = {"meta": meta, **result}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
