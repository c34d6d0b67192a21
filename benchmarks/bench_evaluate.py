"""Time the trace-based importance sampler against a hand-written pure-torch one.

Both estimate log p̂(x) per datum for the same networks, data, K and chunks:

* ``pyro_vae``: :func:`pyro_vae.evaluate.log_marginal` (PSIS off, as PSIS is ArviZ
  work the reference does not do), i.e. Pyro traces + replay, then the float64
  statistics (log p̂, delta-method se, IWAE ladder);
* ``reference``: :func:`pyro_vae.evaluate.reference.mlp_vae_log_weights` in the same
  chunks, with the same float64 statistics.

Prints a table (median of repeats, seconds, samples per second, ratio) and writes
JSON. Target (issue 3): at most 1.15x the reference at K = 1000 on CPU.

    python benchmarks/bench_evaluate.py --k 1000 --n 200
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
from pyro_vae.data.sources import load_dataset
from pyro_vae.evaluate.marginal import _chunk_statistics, iwae_grid, log_marginal
from pyro_vae.evaluate.reference import mlp_vae_log_weights

CASES = {
    # name: (dataset, latent_dim, hidden)
    "digits 64-400-10": ("digits", 10, (400,)),
    "fashion-mnist 784-400-50": ("fashion-mnist", 50, (400,)),
}


def reference_estimate(model, guide, x, k, data_chunk, particle_chunk):
    grid, parts = iwae_grid(k), []
    for first in range(0, len(x), data_chunk):
        xc = x[first : first + data_chunk]
        buffer = torch.empty(k, len(xc), dtype=torch.float64)
        for lo in range(0, k, particle_chunk):
            hi = min(k, lo + particle_chunk)
            buffer[lo:hi] = mlp_vae_log_weights(
                guide.encoder, model.decoder, xc, hi - lo, scale_floor=guide.scale_floor
            )
        parts.append(_chunk_statistics(buffer, grid, psis=False))
    return torch.cat([p["log_px"] for p in parts])


def time_it(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def run_case(name, args):
    dataset, latent, hidden = CASES[name]
    data_dir = "/usr/share/datasets/fashion-mnist"
    splits = load_dataset(dataset, data_dir=data_dir)
    x = torch.bernoulli(
        splits.test[: args.n], generator=torch.Generator().manual_seed(0)
    )
    pyro.set_rng_seed(0)
    cfg = FitConfig(dataset=dataset, latent_dim=latent, hidden=hidden)
    model, guide = build_model_and_guide(cfg, x.shape[1])
    model.eval(), guide.eval()
    result = log_marginal(
        model, guide, x, args.k, psis=False, data_chunk=args.data_chunk
    )
    chunk = result.chunks["particles"]

    def ours():
        log_marginal(model, guide, x, args.k, psis=False, data_chunk=args.data_chunk)

    def ref():
        reference_estimate(model, guide, x, args.k, args.data_chunk, chunk)

    # Interleave so that machine load affects both alike.
    t_ours, all_ours = time_it(ours, args.repeats)
    t_ref, all_ref = time_it(ref, args.repeats)
    samples = args.k * len(x)
    return {
        "case": name,
        "k": args.k,
        "n": len(x),
        "chunks": result.chunks,
        "pyro_vae_seconds": t_ours,
        "reference_seconds": t_ref,
        "ratio": t_ours / t_ref,
        "pyro_vae_samples_per_second": samples / t_ours,
        "reference_samples_per_second": samples / t_ref,
        "all_pyro_vae_seconds": all_ours,
        "all_reference_seconds": all_ref,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--data-chunk", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--json", default="benchmarks/results/bench_evaluate.json")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float32)
    rows = [run_case(name, args) for name in args.cases]
    print(
        f"{'case':<28}{'K':>6}{'n':>6}{'pyro_vae s':>12}{'ref s':>10}{'ratio':>8}"
        f"{'samples/s':>12}"
    )
    for r in rows:
        print(
            f"{r['case']:<28}{r['k']:>6}{r['n']:>6}{r['pyro_vae_seconds']:>12.3f}"
            f"{r['reference_seconds']:>10.3f}{r['ratio']:>8.3f}"
            f"{r['pyro_vae_samples_per_second']:>12.0f}"
        )
    meta = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "target": "ratio <= 1.15 at K = 1000 on CPU",
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
