"""Data-parallel training throughput: one process against two, in the same run.

The product's own loop, :func:`pyro_vae.training.loop.train`, trains the default VAE
(MLP 784-400-10, Bernoulli likelihood, dynamic binarization, global batch 100) on
Fashion-MNIST from ``/usr/share/datasets/fashion-mnist`` (``apt-get install
dataset-fashion-mnist``), or on scikit-learn's digits when those files are absent, for
``--epochs`` epochs; the first is warm-up (tracing, the DDP set-up). Each setting runs
in fresh processes; two processes are started by ``torchrun --standalone`` and train
one model with DistributedDataParallel (``--devices 2`` in ``pyro_vae.cli.fit``).

Two rates, in training images per second, medians over the timed epochs:

* **steps**: global batch over the median time between consecutive steps (the
  gradient all-reduce included, validation and the epoch's bookkeeping not); CPU only,
  since on CUDA it would need a device sync per step;
* **epoch**: training images over the epoch's wall time, from one epoch end to the
  next (validation on each process's shard and the epoch's all-reduces included).

Settings on CPU: 1 process x 1 thread, 1 process x all cores, 2 processes x
(cores / 2) threads; on CUDA (when there is one): 1 process on one GPU, and 2
processes on two GPUs when there are two. The table is printed as Markdown and
written to ``benchmarks/results/bench_distributed.json``.

    python benchmarks/bench_distributed.py
    python benchmarks/bench_distributed.py --epochs 2 --device cpu   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FASHION = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).resolve().parent / "results" / "bench_distributed.json"
BATCH = 100


def _dataset() -> tuple[str, str]:
    """(dataset, data_dir): Fashion-MNIST's files when installed, else digits."""
    if (FASHION / "train-images-idx3-ubyte.gz").is_file():
        return "fashion-mnist", str(FASHION)
    return "digits", "data"


def worker(args: argparse.Namespace) -> None:
    """One process of a setting: train, time, and (rank 0) write ``args.out``."""
    import pyro

    from pyro_vae.cli.build import build_model_and_guide
    from pyro_vae.cli.config import FitConfig, resolve_device
    from pyro_vae.cli.loading import load_run_data
    from pyro_vae.training import Schedule, TrainOptions, distributed
    from pyro_vae.training.loop import make_elbo, train

    device = resolve_device(args.device)
    ctx = None
    if distributed.launched() and int(os.environ["WORLD_SIZE"]) > 1:
        ctx = distributed.init_from_env(device, seed=0)
        device = ctx.device
    try:
        pyro.settings.set(module_local_params=True)
        pyro.set_rng_seed(0)
        dataset, data_dir = _dataset()
        cfg = FitConfig(dataset=dataset, data_dir=data_dir, download=False)
        splits = load_run_data(cfg, device)
        model, guide = build_model_and_guide(cfg, splits.data_dim, splits.image_shape)
        model, guide = model.to(device), guide.to(device)
        if ctx is not None:
            ctx.seed_rngs(0, 0)
        polls: list[float] = []
        epoch_ends: list[float] = []
        epoch_polls: list[int] = []

        def poll() -> bool:  # train()'s should_stop hook: once per step
            polls.append(time.perf_counter())
            return False

        def on_epoch(stats: object) -> None:
            epoch_ends.append(time.perf_counter())  # the epoch's .item() synced
            epoch_polls.append(len(polls))

        started = time.perf_counter()
        train(
            model,
            guide,
            splits,
            Schedule(epochs=args.epochs, batch_size=BATCH, lr=1e-3),
            elbo=make_elbo("trace"),
            options=TrainOptions(distributed=ctx, should_stop=poll, on_epoch=on_epoch),
        )
        if ctx is not None and not ctx.is_main:
            return
        n = len(splits.train)
        epochs = [b - a for a, b in zip(epoch_ends, epoch_ends[1:], strict=False)]
        gaps = [
            b - a
            for lo, hi in zip(epoch_polls, epoch_polls[1:], strict=False)
            for a, b in zip(polls[lo : hi - 1], polls[lo + 1 : hi], strict=False)
        ]
        result = {
            "dataset": dataset,
            "n_train": n,
            "device": str(device),
            "processes": 1 if ctx is None else ctx.world_size,
            "threads_per_process": torch.get_num_threads(),
            "epoch_seconds": epochs,
            "first_epoch_seconds": epoch_ends[0] - started,
            "epoch_images_per_s": n / statistics.median(epochs),
            "step_images_per_s": (
                BATCH / statistics.median(gaps) if device.type == "cpu" else None
            ),
        }
        Path(args.out).write_text(json.dumps(result))
    finally:
        if ctx is not None:
            ctx.close()


def _settings(device: str) -> list[tuple[str, int, int]]:
    """(device, processes, threads per process) to measure."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    rows = []
    if device in ("auto", "cpu"):
        rows += [("cpu", 1, 1), ("cpu", 1, cores), ("cpu", 2, max(1, cores // 2))]
    if device in ("auto", "cuda") and torch.cuda.is_available():
        rows.append(("cuda", 1, 1))
        if torch.cuda.device_count() >= 2:
            rows.append(("cuda", 2, 1))
    return rows


def measure(device: str, processes: int, threads: int, epochs: int) -> dict:
    """Run one setting in fresh processes; its rank 0's measurements."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        me = [str(Path(__file__).resolve()), "--worker", "--out", str(out)]
        me += ["--device", device, "--epochs", str(epochs)]
        cmd = [sys.executable, *me]
        if processes > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd += ["--nproc-per-node", str(processes), *me]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        env["OMP_NUM_THREADS"] = str(threads)
        subprocess.run(cmd, env=env, check=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="the first is warm-up")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first is warm-up)")
    if args.worker:
        worker(args)
        return
    rows = []
    for device, processes, threads in _settings(args.device):
        row = measure(device, processes, threads, args.epochs)
        rows.append(row)
        print(f"measured {device} x {processes} processes x {threads} threads")
    base = {}  # per device: the best one-process setting (the most threads)
    for r in rows:
        kind = r["device"].split(":")[0]
        if r["processes"] == 1 and (
            kind not in base
            or r["threads_per_process"] > base[kind]["threads_per_process"]
        ):
            base[kind] = r
    lines = [
        "| device | processes x threads | images/s (steps) | images/s (epoch) | "
        "epoch s | speed-up (epoch) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = base[r["device"].split(":")[0]]
        steps = r["step_images_per_s"]
        lines.append(
            f"| {r['device'].split(':')[0]} | {r['processes']} x "
            f"{r['threads_per_process']} | "
            f"{'-' if steps is None else f'{steps:,.0f}'} | "
            f"{r['epoch_images_per_s']:,.0f} | "
            f"{statistics.median(r['epoch_seconds']):.2f} | "
            f"{r['epoch_images_per_s'] / ref['epoch_images_per_s']:.2f} |"
        )
    table = "\n".join(lines)
    first = rows[0]
    print(
        f"\n{first['dataset']}, {first['n_train']} training images, MLP 784-400-10 "
        f"(digits: 64-400-10), global batch {BATCH}, medians of {args.epochs - 1} "
        f"epoch(s) after one warm-up; speed-up: against one process with the most "
        "threads\n"
    )
    print(table)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "rows": rows,
                "table": table,
                "epochs": args.epochs,
                "batch": BATCH,
                "machine": {
                    "cpu_cores": os.cpu_count(),
                    "cuda": torch.cuda.get_device_name()
                    if torch.cuda.is_available()
                    else None,
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                },
                "date": time.strftime("%Y-%m-%d"),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
