"""Quality of the swappable parts on one fixed protocol: test log p̂(x) ± se per config.

Protocol (``--suite parts``): Fashion-MNIST from its IDX files, statically binarized
(every split drawn once with seed 1), latent size 50, batch 100, Adam 1e-3, seed 0,
``--epochs`` passes (default 10) over the 54000 training images; then K = 1000
importance samples on each of the first 1000 test images (pyro_vae.evaluate). For
each configuration it reports test log p̂(x) ± Monte Carlo se, the ELBO, the gap,
the fraction of images with k̂ > 0.7 and seconds per training epoch, prints a
Markdown table and writes JSON.

Outside reference on the same protocol (from the issue): pythae's VAE with its default
MLP reached log p̂(x) ≈ -238.0 nats (K = 1000, first 1000 test images, 10 epochs,
z = 50) at 4.1 s per epoch on a 2-core CPU.

Protocol ``--suite mnist``: the Burda et al. (2016) MLP, encoder and decoder 2 x 200
tanh, z = 50, Bernoulli likelihood, dynamic binarization of the training images (each
batch drawn afresh), test images binarized once with seed 1, batch 100, Adam 1e-3;
MNIST when its IDX files are in ``--mnist-dir``, Fashion-MNIST always. Published
reference: 86.76 nats (-log p(x), VAE, k = 1, MNIST, Burda et al. 2016, Table 1,
after 3280 passes, 3^i at each of 8 learning rates); this protocol trains
``--epochs`` passes and says so; bench_mnist.py runs the published schedule.

    python benchmarks/bench_quality.py --suite parts
    python benchmarks/bench_quality.py --suite mnist  # results/..._mnist.json
    python benchmarks/bench_quality.py --suite parts --epochs 1 --n-eval 100 --k 100
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import pyro
import torch

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.data import Splits, binarize_splits
from pyro_vae.data.sources import load_dataset
from pyro_vae.errors import PyroVAEError
from pyro_vae.evaluate import check_consistency, log_marginal
from pyro_vae.training.loop import Schedule, make_elbo, train

BURDA = {"hidden": (200, 200), "activation": "tanh"}
SUITES = {
    "parts": {
        "Gaussian guide, N(0, I) prior (MLP 400)": {},
        "Gaussian guide, N(0, I) prior (MLP 512, pythae's network)": {"hidden": (512,)},
        "same, batch 64 (pythae's default batch)": {"hidden": (512,), "batch_size": 64},
        "mixture-of-Gaussians prior (10)": {"prior": "mog", "components": 10},
        "VampPrior (500 pseudo-inputs)": {"prior": "vamp", "pseudo_inputs": 500},
        "flow guide (2 IAF steps)": {"guide": "flow", "flow_steps": 2},
        "conv networks": {"arch": "conv"},
    },
    "mnist": {
        "MNIST, Burda MLP 2x200 tanh": {"dataset": "mnist", **BURDA},
        "Fashion-MNIST, Burda MLP 2x200 tanh": {"dataset": "fashion-mnist", **BURDA},
    },
}
BINARIZATION = {"parts": "static", "mnist": "dynamic"}


def run_config(name, options, splits, args):
    pyro.set_rng_seed(args.seed)
    options = {
        "dataset": "fashion-mnist",
        "hidden": (400,),
        "batch_size": 100,
        **options,
    }
    cfg = FitConfig(latent_dim=args.latent_dim, **options)
    model, guide = build_model_and_guide(cfg, splits.data_dim, splits.image_shape)
    started = time.perf_counter()
    history, _ = train(
        model,
        guide,
        Splits.of(splits.train, splits.valid[:1000], binarization=splits.binarization),
        Schedule(epochs=args.epochs, batch_size=cfg.batch_size, lr=1e-3),
        elbo=make_elbo("trace"),
    )
    train_seconds = time.perf_counter() - started
    model.eval(), guide.eval()
    x = splits.test[: args.n_eval]
    start = time.perf_counter()
    result = log_marginal(model, guide, x, args.k, seed=args.seed)
    check_consistency(result)
    summary = result.summary()
    row = {
        "config": name,
        "options": options,
        "test_log_px": summary["log_px"]["mean"],
        "test_log_px_se": summary["log_px"]["se"],
        "test_elbo": summary["elbo"]["mean"],
        "gap": summary["gap"]["mean"],
        "khat_above_0.7": summary["khat"]["fraction_above_0.7"],
        "seconds_per_epoch": statistics.median(h.seconds for h in history),
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start,
        "final_valid_elbo": history[-1].valid_elbo,
    }
    print(json.dumps(row), flush=True)
    return row


def _wall(row) -> str:
    if "train_seconds" not in row:  # rows measured before this column existed
        return "–"
    return f"{row['train_seconds'] + row['eval_seconds']:.0f}"


def markdown(rows, args) -> str:
    data = "Fashion-MNIST" if args.suite == "parts" else "MNIST / Fashion-MNIST"
    lines = [
        f"{data}, {BINARIZATION[args.suite]} binarization of the training images "
        f"(test binarized once, seed 1), z = {args.latent_dim}, {args.epochs} epochs, "
        f"K = {args.k} on the first {args.n_eval} test images (nats per image; "
        "higher is better)",
        "",
        "| configuration | log p̂(x) ± se | ELBO | gap | k̂ > 0.7 | s / epoch | "
        "wall s (train + eval) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['test_log_px']:.2f} ± {r['test_log_px_se']:.2f} | "
            f"{r['test_elbo']:.2f} | {r['gap']:.2f} | {100 * r['khat_above_0.7']:.0f}% "
            f"| {r['seconds_per_epoch']:.1f} | "
            f"{_wall(r)} |"
        )
    if args.suite == "parts":
        lines.append(
            "| pythae VAE, default MLP (reference quoted in the issue) "
            "| ≈ -238.0 | | | | 4.1 | |"
        )
    else:
        lines.append(
            "| VAE, MNIST, Burda et al. (2016) Table 1 (published; 3280 passes) "
            "| -86.76 | | | | | |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=tuple(SUITES), default="parts")
    parser.add_argument("--configs", nargs="*", default=None, help="names to run")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument(
        "--mnist-dir", default="data", help="where MNIST's IDX files are looked for"
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--n-eval", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="default: results/bench_quality[_SUITE].json")
    parser.add_argument(
        "--append",
        action="store_true",
        help="merge these rows into the JSON file's rows (configs run one by one)",
    )
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float32)
    pyro.settings.set(module_local_params=True)
    configs = SUITES[args.suite]
    names = args.configs or list(configs)
    rows = []
    for name in names:
        dataset = configs[name].get("dataset", "fashion-mnist")
        folder = args.mnist_dir if dataset == "mnist" else args.data_dir
        try:
            raw = load_dataset(dataset, data_dir=folder, download=False)
        except PyroVAEError as err:
            print(f"skipped {name}: {err}", flush=True)
            continue
        splits = binarize_splits(raw, BINARIZATION[args.suite])
        rows.append(run_config(name, configs[name], splits, args))
    suffix = "" if args.suite == "parts" else f"_{args.suite}"
    path = Path(args.json or f"benchmarks/results/bench_quality{suffix}.json")
    if args.append and path.exists():
        done = {r["config"]: r for r in json.loads(path.read_text())["rows"]}
        done.update({r["config"]: r for r in rows})
        rows = [done[name] for name in configs if name in done]
    table = markdown(rows, args)
    print(table)
    meta = {
        "protocol": vars(args),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
