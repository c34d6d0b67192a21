"""Training speed: the pyro_vae step against plain PyTorch, Pyro's paths and peers.

**Steps.** For MLP 784-400-50 with a Bernoulli likelihood at batch 128 and 1024, on CPU
and on CUDA when there is one, every path below trains on the same random binary data
drawn through :func:`pyro_vae.data.batches`. A step's time is the wall time between two
consecutive step ends (batch slicing included); the table gives the median over
``--steps`` steps after ``--warmup``, the smallest such median of ``--repeats`` runs
(other work on the machine only ever slows a run down). On CUDA the device is
synchronized once per step in the timer, which the real loop does not do. Rows:

* ``plain PyTorch``: the reference, hand-written ELBO with the analytic KL, the default
  ``torch.optim.Adam``; ``plain PyTorch, fused Adam`` the same with ``fused=True``;
* ``pyro_vae train()``: the product itself, timed from its per-step hook;
* the ideas one by one: Pyro's SVI loop as the tutorials write it, Trace_ELBO as a
  torch module with validation on and off, TraceMeanField_ELBO, Pyro's own
  JitTrace_ELBO / JitTraceMeanField_ELBO, the pyro_vae trace without fused Adam,
  ``torch.compile`` of the Trace_ELBO module (its compile time is in the warm-up), and
  8 particles vectorized and sequential.

**Epochs.** One pass over the 60,000 Fashion-MNIST training images (IDX files), batch
128, MLP 784-512-50 with ReLU (pythae's default networks), three ways in the same run:
``pyro_vae train()``; the DataLoader-based Pyro SVI loop of the tutorials
(torchvision dataset, ``ToTensor``, ``DataLoader``, ``svi.step``); and pythae's VAE
trainer when pythae is installed (``pip install pythae``). Median of ``--epochs``.

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --steps 50 --epochs 1 --skip-peers   # quick look
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    JitTraceMeanField_ELBO,
    Trace_ELBO,
    TraceMeanField_ELBO,
)

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.data import Splits, batches, binarize_splits
from pyro_vae.data.sources import _stage_idx_files, load_dataset
from pyro_vae.training.loop import Schedule, TrainOptions, make_elbo, train
from pyro_vae.training.step import StepLoss, make_optimizer

LATENT = 50


class StepTimer:
    """Records the time of every step end; durations are the differences."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.ends: list[float] = []

    def __call__(self) -> bool:
        self.sync()
        self.ends.append(time.perf_counter())
        return False  # train()'s should_stop hook: never stop

    def median_ms(self, warmup: int) -> float:
        gaps = [b - a for a, b in itertools.pairwise(self.ends[warmup:])]
        return 1e3 * statistics.median(gaps)


def _parts(device, hidden=(400,)):
    pyro.set_rng_seed(0)
    cfg = FitConfig(dataset="fashion-mnist", latent_dim=LATENT, hidden=hidden)
    model, guide = build_model_and_guide(cfg, 784, (1, 28, 28))
    return model.to(device), guide.to(device)


def _loop(step: Callable, x: torch.Tensor, b: int, timer: StepTimer) -> None:
    for batch in batches(x, b, shuffle=True):
        step(batch)
        timer()


def plain_step(model, guide, fused=False):
    """The reference: the same networks, analytic KL, no Pyro."""
    enc, dec, floor = guide.encoder, model.decoder, guide.scale_floor
    params = [*enc.parameters(), *dec.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3, fused=fused or None)

    def step(x):
        loc, raw = enc(x).split(LATENT, -1)
        scale = F.softplus(raw) + floor
        z = loc + scale * torch.randn_like(loc)
        log_px = -F.binary_cross_entropy_with_logits(dec(z), x, reduction="none")
        kl = 0.5 * (loc**2 + scale**2 - 1) - scale.log()
        loss = -(log_px.sum() - kl.sum())
        opt.zero_grad(set_to_none=True)
        (loss / len(x)).backward()
        opt.step()

    return step


def module_step(loss_fn, *, validate, jit=False, fused=False):
    """A Pyro ELBO as a torch module with a torch optimizer."""
    call = StepLoss(loss_fn, jit=True) if jit else loss_fn
    opt = (make_optimizer if fused else _adam)(loss_fn.parameters(), 1e-3)

    def step(x):
        with pyro.validation_enabled(validate or jit):
            loss = call(x)
        opt.zero_grad(set_to_none=True)
        (loss / len(x)).backward()
        opt.step()

    return step


def _adam(params, lr):
    return torch.optim.Adam(params, lr=lr)


def svi_step(model, guide, elbo):
    """Pyro's SVI as the tutorials use it: pyro.optim.Adam, a float loss per step.

    The tutorials keep parameters in Pyro's global store, where ``pyro.optim``
    finds them: the step runs with ``module_local_params`` off.
    """
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)

    def step(x):
        with global_params():
            return svi.step(x)

    return step


@contextmanager
def global_params() -> Iterator[None]:
    pyro.settings.set(module_local_params=False)
    try:
        yield
    finally:
        pyro.settings.set(module_local_params=True)


def time_steps(device, b, args) -> list[dict]:
    n = (args.warmup + args.steps + 1) * b
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.bernoulli(torch.rand(n, 784, device=device, generator=gen))
    cases: dict[str, Callable] = {
        "plain PyTorch (reference)": lambda m, g: plain_step(m, g),
        "plain PyTorch, fused Adam": lambda m, g: plain_step(m, g, fused=True),
        "Pyro SVI + Trace_ELBO (tutorial loop)": lambda m, g: svi_step(
            m, g, Trace_ELBO()
        ),
        "Trace_ELBO module, validation on": lambda m, g: module_step(
            Trace_ELBO()(m, g), validate=True
        ),
        "Trace_ELBO module, validation off": lambda m, g: module_step(
            Trace_ELBO()(m, g), validate=False
        ),
        "TraceMeanField_ELBO, validation off": lambda m, g: module_step(
            TraceMeanField_ELBO()(m, g), validate=False
        ),
        "Pyro JitTrace_ELBO (SVI)": lambda m, g: svi_step(m, g, JitTrace_ELBO()),
        "Pyro JitTraceMeanField_ELBO (SVI)": lambda m, g: svi_step(
            m, g, JitTraceMeanField_ELBO()
        ),
        "pyro_vae trace, default Adam": lambda m, g: module_step(
            Trace_ELBO()(m, g), validate=False, jit=True
        ),
    }
    if args.compile:
        cases["torch.compile of the Trace_ELBO module"] = lambda m, g: module_step(
            torch.compile(Trace_ELBO()(m, g)), validate=False
        )
    if b == 128:
        cases["8 particles, vectorized"] = lambda m, g: module_step(
            make_elbo("trace", 8)(m, g), validate=False
        )
        cases["8 particles, sequential"] = lambda m, g: module_step(
            Trace_ELBO(num_particles=8)(m, g), validate=False
        )
    _loop(plain_step(*_parts(device)), x, b, StepTimer(device))  # warm the machine
    rows = [_product_row(device, b, x, args)]
    for name, make in cases.items():
        medians, error = [], None
        compiled = "compile" in name
        for _ in range(1 if compiled else args.repeats):  # one compile is enough
            if compiled:
                torch._dynamo.reset()
            pyro.clear_param_store()
            model, guide = _parts(device)
            timer = StepTimer(device)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _loop(make(model, guide), x, b, timer)
                medians.append(timer.median_ms(args.warmup))
            except Exception as err:  # noqa: BLE001 - report the path as broken
                error = f"{type(err).__name__}: {err}".splitlines()[0]
                break
        ms = min(medians) if medians else float("nan")
        rows.append({"path": name, "ms": ms, "error": error})
        print(json.dumps({"device": str(device), "batch": b, **rows[-1]}), flush=True)
    ref = next(r["ms"] for r in rows if r["path"].startswith("plain PyTorch (r"))
    fused = next(r["ms"] for r in rows if r["path"].startswith("plain PyTorch, f"))
    for r in rows:
        r.update(device=str(device), batch=b, ratio=r["ms"] / ref)
        r["ratio_fused"] = r["ms"] / fused
    return rows


def _product_row(device, b, x, args) -> dict:
    model, guide = _parts(device)
    timer = StepTimer(device)
    train(model, guide, Splits.of(x, x[:b]), Schedule(epochs=1, batch_size=b, lr=1e-3),
          elbo=make_elbo("trace"), options=TrainOptions(should_stop=timer))  # fmt: skip
    row = {
        "path": "pyro_vae train()",
        "ms": timer.median_ms(args.warmup),
        "error": None,
    }
    print(json.dumps({"device": str(device), "batch": b, **row}), flush=True)
    return row


def time_epochs(args) -> list[dict]:
    """One epoch over Fashion-MNIST: pyro_vae, the DataLoader SVI loop, pythae."""
    splits = binarize_splits(
        load_dataset("fashion-mnist", data_dir=args.data_dir), "static"
    )
    x = torch.cat([splits.train, splits.valid])  # all 60000, binarized with seed 1
    rows = []
    for name, run in (
        ("pyro_vae train()", lambda: _epoch_pyro_vae(x)),
        ("Pyro SVI, torchvision DataLoader loop", lambda: _epoch_dataloader(args)),
        ("pythae VAE trainer", lambda: _epoch_pythae(x)),
    ):
        if args.skip_peers and name != "pyro_vae train()":
            continue
        try:
            seconds = [run() for _ in range(args.epochs)]
            row = {"path": name, "seconds": statistics.median(seconds), "error": None}
        except Exception as err:  # noqa: BLE001 - e.g. pythae not installed
            error = f"{type(err).__name__}: {err}".splitlines()[0]
            row = {"path": name, "seconds": float("nan"), "error": error}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ours = rows[0]["seconds"]
    for r in rows:
        r["speedup_of_pyro_vae"] = r["seconds"] / ours
    return rows


def _epoch_pyro_vae(x) -> float:
    """The second epoch of a run: the first also validates and traces (once)."""
    model, guide = _parts("cpu", hidden=(512,))
    history, _ = train(model, guide, Splits.of(x, x[:128]),
                       Schedule(epochs=2, batch_size=128, lr=1e-3),
                       elbo=make_elbo("trace"))  # fmt: skip
    return history[-1].seconds


def _epoch_dataloader(args) -> float:
    from torchvision import datasets, transforms

    root = _stage_idx_files("FashionMNIST", Path(args.data_dir))
    data = datasets.FashionMNIST(root, train=True, transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=True)
    pyro.clear_param_store()
    model, guide = _parts("cpu", hidden=(512,))
    step = svi_step(model, guide, Trace_ELBO())
    start = time.perf_counter()
    for images, _ in loader:
        step(images.reshape(-1, 784).bernoulli())
    return time.perf_counter() - start


def _epoch_pythae(x) -> float:
    from pythae.data.datasets import BaseDataset
    from pythae.models import VAE, VAEConfig
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    torch.manual_seed(0)
    model = VAE(
        VAEConfig(input_dim=(1, 28, 28), latent_dim=LATENT, reconstruction_loss="bce")
    )
    config = BaseTrainerConfig(
        output_dir="/tmp/pythae_bench",
        num_epochs=1,
        learning_rate=1e-3,
        per_device_train_batch_size=128,
        no_cuda=True,
    )
    data = BaseDataset(x.reshape(-1, 1, 28, 28), torch.zeros(len(x)))
    trainer = BaseTrainer(model, data, training_config=config)
    trainer.prepare_training()
    start = time.perf_counter()
    trainer.train_step(1)
    return time.perf_counter() - start


def markdown(step_rows, epoch_rows) -> str:
    lines = [
        "| device | batch | path | ms / step | vs plain | vs plain, fused Adam |",
        "|---|---|---|---|---|---|",
    ]
    for r in step_rows:
        note = f" ({r['error']})" if r["error"] else ""
        lines.append(
            f"| {r['device']} | {r['batch']} | {r['path']}{note} | {r['ms']:.2f} | "
            f"{r['ratio']:.2f}× | {r['ratio_fused']:.2f}× |"
        )
    if epoch_rows:
        lines += [
            "",
            "| Fashion-MNIST epoch (CPU, batch 128, MLP 784-512-50) | s / epoch | "
            "× pyro_vae's time |",
            "|---|---|---|",
        ]
        for r in epoch_rows:
            note = f" ({r['error']})" if r["error"] else ""
            lines.append(
                f"| {r['path']}{note} | {r['seconds']:.2f} | "
                f"{r['speedup_of_pyro_vae']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="*", default=[128, 1024])
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per step path; the min median"
    )
    parser.add_argument("--epochs", type=int, default=2, help="epoch repeats")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time torch.compile too (about half a minute of compiling per batch)",
    )
    parser.add_argument("--skip-epochs", action="store_true")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--json", default="benchmarks/results/bench_train.json")
    args = parser.parse_args(argv)
    pyro.settings.set(module_local_params=True)
    torch._logging.set_logs(dynamo=logging.ERROR)  # graph-break reports, one a step
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    step_rows = [
        r for d in devices for b in args.batches for r in time_steps(d, b, args)
    ]
    epoch_rows = [] if args.skip_epochs else time_epochs(args)
    table = markdown(step_rows, epoch_rows)
    print(table)
    meta = {
        "args": vars(args),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "steps": step_rows, "epochs": epoch_rows, "table": table}
    path.write_text(json.dumps(doc, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
