"""Burda et al. (2016), Table 1, reproduced stage by stage, with pythae side by side.

**Protocol** (Burda, Grosse & Salakhutdinov 2016, section 5 and Table 1): MNIST,
the training images dynamically binarized (a fresh Bernoulli draw per batch); one
stochastic layer of 50 units; encoder and decoder of two deterministic layers of 200
tanh units each; Bernoulli likelihood; batch 20; Adam with β1 = 0.9, β2 = 0.999,
ε = 1e-4; stage i = 0..7 trains 3^i epochs at learning rate 0.001·10^(−i/7) (3280
epochs in all), one Adam continued across the stages (as the authors' released
code does). As in that code, 400 training images are held out (here a fixed random
400, seed 0; there the last 400) and the other 59,600 train. The test images are
binarized once: ``torch.bernoulli`` with a CPU generator seeded 1 (:data:`TEST_SEED`),
the same draw on every device. Test NLL = −log p̂(x), importance sampling with the
guide, K = ``--eval-k`` (5000 in the paper) on the first ``--eval-n`` test images
(all 10,000 in the paper), seed 0, at every stage end (``--stage-eval-k`` and
``--stage-eval-n``: cheaper settings for the stages before this run's last; every
entry states its K and n); ``--ais N`` cross-checks the last stage with AIS.

**Rows** (``--rows``): ``vae``; ``iwae5``, ``iwae50`` (IWAE bound, reparameterized
gradients) and ``iwae5-dreg``, ``iwae50-dreg`` (DReG guide gradients); ``vamp`` (ELBO,
VampPrior with 500 pseudo-inputs); ``pythae-vae``, ``pythae-iwae5``, ``pythae-iwae50``:
pythae 0.1.2's VAE and IWAE with the same networks (``pyro_vae.nn.mlp``, so the same
initialization), data, batch, Adam and schedule, trained by pythae's own
``BaseTrainer.train_step`` one epoch at a time and scored by the same estimator (its
encoder and decoder wrapped as a Pyro guide and model). ``--install-pythae`` installs
pythae with pip into this environment; without pythae the pythae rows are skipped.

**Resuming.** Each row keeps a directory ``--out/ROW``: ``stageI.pt`` at every stage
end (weights, Adam, RNG states), ``partial.pt`` after every epoch inside a stage, and
``state.json``, the finished stages with their test NLL. Running the same command
again continues from the last finished epoch; a finished stage is never retrained.
Each stage end appends to the row's learning curve in ``--json``.

Differences from the authors' code, kept on purpose: σ of q(z|x) is softplus(·) +
1e-4 here, exp(·) there; the decoder's output bias is not initialized to the data
mean; Adam is torch's (their released Adam defaults to β1 = 0.99, starts the second
moment at 1 and uses the learning rate 1e-4·round(10^(1−i/7), 1); the paper states
the values above). ``--dataset digits`` (scikit-learn's 8x8 digits) runs the same
code without MNIST, for smoke tests.

    python benchmarks/bench_mnist.py --rows vae --stages 6 --mnist-dir DIR
    python benchmarks/bench_mnist.py --rows vae iwae5 --stages 1 --dataset digits \\
        --max-epochs-per-stage 1 --eval-k 10 --eval-n 20       # a smoke run
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig, resolve_device
from pyro_vae.data import Splits
from pyro_vae.data.sources import load_dataset
from pyro_vae.errors import PyroVAEError
from pyro_vae.evaluate import EstimatorConsistencyError, check_consistency, log_marginal
from pyro_vae.evaluate.ais import ais_log_marginal
from pyro_vae.files import atomic_open
from pyro_vae.guides.base import AmortizedGuide
from pyro_vae.losses import Trace_IWAE
from pyro_vae.models import VAE, BernoulliLikelihood
from pyro_vae.nn import mlp
from pyro_vae.training.checkpoint import load_checkpoint, save_checkpoint
from pyro_vae.training.loop import Schedule, TrainOptions, make_elbo, train
from pyro_vae.training.state import capture_rng, restore_rng, snapshot
from pyro_vae.training.step import make_optimizer

STAGES = 8  # i = 0..7
BATCH = 20
ADAM_EPS = 1e-4  # betas are torch's defaults, (0.9, 0.999), as in the paper
LATENT, HIDDEN, ACTIVATION = 50, (200, 200), "tanh"
N_VALID = 400
TEST_SEED, SPLIT_SEED, EVAL_SEED = 1, 0, 0
PYTHAE = "pythae==0.1.2"
BURDA = "Burda et al. 2016, Table 1"


def stage_epochs(i: int, cap: int | None = None) -> int:
    return 3**i if cap is None else min(3**i, cap)


def stage_lr(i: int) -> float:
    return 1e-3 * 10 ** (-i / 7)


class Row(NamedTuple):
    """What a row trains, and the published number beside it."""

    loss: str  # "elbo" or "iwae"
    k: int = 1
    grad: str = "reparam"
    prior: str = "normal"
    peer: bool = False  # pythae's model and trainer
    published: float = 86.76
    source: str = f"{BURDA}, VAE (k = 1)"


ROWS = {
    "vae": Row("elbo"),
    "iwae5": Row("iwae", 5, published=85.54, source=f"{BURDA}, IWAE k = 5"),
    "iwae50": Row("iwae", 50, published=84.78, source=f"{BURDA}, IWAE k = 50"),
    "iwae5-dreg": Row(
        "iwae", 5, "dreg", published=85.54, source=f"{BURDA}, IWAE k = 5 (reparam)"
    ),
    "iwae50-dreg": Row(
        "iwae", 50, "dreg", published=84.78, source=f"{BURDA}, IWAE k = 50 (reparam)"
    ),
    "vamp": Row(
        "elbo",
        prior="vamp",
        published=85.57,
        source="Tomczak & Welling 2018 (static MNIST, z = 40, other networks, "
        "warm-up; pythae's rerun 85.79): not this protocol",
    ),
    "pythae-vae": Row("elbo", peer=True),
    "pythae-iwae5": Row(
        "iwae", 5, peer=True, published=85.54, source=f"{BURDA}, IWAE k = 5"
    ),
    "pythae-iwae50": Row(
        "iwae", 50, peer=True, published=84.78, source=f"{BURDA}, IWAE k = 50"
    ),
}


# --- data --------------------------------------------------------------------------


def load_data(args: argparse.Namespace, device: torch.device) -> Splits:
    """Grey-level training images, 400 held out and the test images binarized once."""
    raw = load_dataset(args.dataset, data_dir=args.mnist_dir, download=False)
    x = torch.cat([raw.train, raw.valid])  # undo load_dataset's 10% split
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_valid = min(N_VALID, len(x) // 10)
    gen = torch.Generator().manual_seed(TEST_SEED)
    test = torch.bernoulli(raw.test, generator=gen)
    valid = torch.bernoulli(x[perm[:n_valid]], generator=gen)
    splits = Splits(
        x[perm[n_valid:]], valid, test, raw.image_shape, binarization="dynamic"
    )
    return splits.to(device)


# --- the learners: ours and pythae's ------------------------------------------------


class PyroVAERow:
    """pyro_vae's model and guide, trained by :func:`pyro_vae.training.train`."""

    def __init__(self, spec: Row, splits: Splits, device: torch.device, seed: int):
        pyro.set_rng_seed(seed)
        cfg = FitConfig(
            latent_dim=LATENT,
            hidden=HIDDEN,
            activation=ACTIVATION,
            prior=spec.prior,
            pseudo_inputs=500,
        )
        model, guide = build_model_and_guide(cfg, splits.data_dim, splits.image_shape)
        self.model = model.to(device, torch.float32)
        self.guide = guide.to(device, torch.float32)
        params = torch.nn.ModuleList([self.model, self.guide]).parameters()
        self.optimizer = make_optimizer(params, stage_lr(0), eps=ADAM_EPS)
        self.objective = None if spec.loss == "elbo" else Trace_IWAE(spec.k, spec.grad)
        self.splits, self.step = splits, 0

    def programs(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        return self.model, self.guide

    def state(self, epoch: int) -> dict:
        return snapshot(self.model, self.guide, self.optimizer, epoch, self.step)

    def load(self, payload: dict) -> None:
        self.model.load_state_dict(payload["model"])
        self.guide.load_state_dict(payload["guide"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.step = payload["step"]
        restore_rng(payload["rng"])

    def train_epochs(self, first: int, last: int, lr: float, on_epoch) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        def hook(stats) -> None:
            self.step = stats.step
            on_epoch(asdict(stats))

        train(
            self.model,
            self.guide,
            self.splits,
            Schedule(last, BATCH, lr, start_epoch=first, start_step=self.step),
            elbo=make_elbo("trace"),
            objective=self.objective,
            optimizer=self.optimizer,
            options=TrainOptions(on_epoch=hook),
        )


def ensure_pythae(install: bool) -> str | None:
    """None when pythae imports (installing it first if asked); else why not."""
    try:
        import pythae  # noqa: F401
    except ImportError:
        if not install:
            return f"pythae is not installed; pass --install-pythae ({PYTHAE})"
        cmd = [sys.executable, "-m", "pip", "install", "-q", PYTHAE]
        print(f"installing {PYTHAE}: {' '.join(cmd)}", flush=True)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"pip could not install {PYTHAE}: {err}"
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            return f"pip could not install {PYTHAE}: {lines[-1]}"
        try:
            import pythae  # noqa: F401, F811
        except ImportError as err:
            return f"{PYTHAE} installed but does not import: {err}"
    return None


class _PythaeGuide(AmortizedGuide):
    """pythae's encoder as a Pyro guide: q(z|x) = N(μ, exp(log σ²/2))."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        out = self.encoder(x)
        scale = torch.exp(0.5 * out.log_covariance)
        return dist.Normal(out.embedding, scale).to_event(1)


class PythaeRow:
    """pythae's VAE or IWAE, trained by pythae's BaseTrainer one epoch at a time.

    Each call makes a trainer (pythae takes its learning rate and epochs per
    trainer) and loads the previous Adam state into its optimizer, so Adam
    continues as in ours. pythae's progress-bar callback is removed (3280 bars
    in a log); pythae's step, data loader and loss are as pythae runs them.
    """

    def __init__(
        self, spec: Row, splits: Splits, device: torch.device, seed: int, folder: Path
    ):
        from pythae.models import IWAE, IWAEConfig, VAEConfig
        from pythae.models import VAE as PythaeVAE

        torch.manual_seed(seed)
        encoder, decoder = _pythae_networks(splits.data_dim)
        common = {"input_dim": (splits.data_dim,), "latent_dim": LATENT}
        common["reconstruction_loss"] = "bce"
        if spec.loss == "iwae":
            model = IWAE(IWAEConfig(**common, number_samples=spec.k), encoder, decoder)
        else:
            model = PythaeVAE(VAEConfig(**common), encoder, decoder)
        self.model, self.device, self.seed = model.to(device), device, seed
        self.dataset = _dynamic_dataset(splits.train.cpu())
        self.optimizer_state: dict | None = None
        self.folder = folder  # pythae's trainer writes its (empty) folders here

    def programs(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        decoder = self.model.decoder.logits  # Bernoulli logits: sigmoid's input
        prior = dist.Normal(torch.zeros(LATENT, device=self.device), 1.0).to_event(1)
        return VAE(prior, decoder, BernoulliLikelihood()), _PythaeGuide(
            self.model.encoder
        )

    def state(self, epoch: int) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer_state,
            "epoch": epoch,
            "step": 0,
            "rng": capture_rng(),
        }

    def load(self, payload: dict) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer_state = payload["optimizer"]
        restore_rng(payload["rng"])

    def train_epochs(self, first: int, last: int, lr: float, on_epoch) -> None:
        from pythae.trainers import BaseTrainer, BaseTrainerConfig
        from pythae.trainers.training_callbacks import ProgressBarCallback

        for name in list(logging.root.manager.loggerDict):
            if name.startswith("pythae"):  # "Model passed sanity check", per stage
                logging.getLogger(name).setLevel(logging.WARNING)
        config = BaseTrainerConfig(
            output_dir=str(self.folder / "pythae"),
            num_epochs=last - first + 1,
            learning_rate=lr,
            per_device_train_batch_size=BATCH,
            optimizer_cls="Adam",
            optimizer_params={"betas": (0.9, 0.999), "eps": ADAM_EPS},
            seed=self.seed * 100_000 + first,
            no_cuda=self.device.type != "cuda",
        )
        trainer = BaseTrainer(self.model, self.dataset, training_config=config)
        trainer.prepare_training()
        handler = trainer.callback_handler
        handler.callbacks = [
            c for c in handler.callbacks if not isinstance(c, ProgressBarCallback)
        ]
        if self.optimizer_state is not None:
            trainer.optimizer.load_state_dict(self.optimizer_state)
            for group in trainer.optimizer.param_groups:
                group["lr"] = lr
        for epoch in range(first, last + 1):
            start = time.perf_counter()
            loss = trainer.train_step(epoch - first + 1)
            seconds = time.perf_counter() - start
            self.optimizer_state = trainer.optimizer.state_dict()
            on_epoch({"epoch": epoch, "seconds": seconds, "train_loss": float(loss)})


def _pythae_networks(data_dim: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The Burda networks as pythae's encoder and decoder, built by pyro_vae's mlp."""
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self) -> None:
            BaseEncoder.__init__(self)
            self.net = mlp(data_dim, HIDDEN, 2 * LATENT, ACTIVATION)

        def forward(self, x: torch.Tensor) -> ModelOutput:
            mu, log_var = self.net(x.reshape(len(x), -1)).chunk(2, dim=-1)
            return ModelOutput(embedding=mu, log_covariance=log_var)

    class Decoder(BaseDecoder):
        def __init__(self) -> None:
            BaseDecoder.__init__(self)
            self.logits = mlp(LATENT, HIDDEN, data_dim, ACTIVATION)

        def forward(self, z: torch.Tensor) -> ModelOutput:
            return ModelOutput(reconstruction=torch.sigmoid(self.logits(z)))

    return Encoder(), Decoder()


def _dynamic_dataset(x: torch.Tensor):
    """pythae's BaseDataset drawing a fresh binarization at every access."""
    from pythae.data.datasets import BaseDataset, DatasetOutput

    class DynamicBinarized(BaseDataset):
        def __getitem__(self, index):
            return DatasetOutput(data=torch.bernoulli(self.data[index]), labels=0.0)

    return DynamicBinarized(x, torch.zeros(len(x)))


# --- one row, stage by stage, resumable ----------------------------------------------


@contextmanager
def locked(path: Path, wait: bool):
    """An exclusive lock on ``path`` (created): refuse, or wait, if held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise PyroVAEError(f"{path.parent} is in use by another run") from None
        yield


def write_json(path: Path, doc: dict) -> None:
    with atomic_open(path, "w") as f:
        f.write(json.dumps(doc, indent=2) + "\n")


def settings_of(name: str, args: argparse.Namespace, splits: Splits) -> dict:
    """What a run directory was trained with; a resumed run must match it."""
    return {
        "row": name,
        **ROWS[name]._asdict(),
        "dataset": args.dataset,
        "n_train": len(splits.train),
        "n_valid": len(splits.valid),
        "batch_size": BATCH,
        "adam": {"betas": [0.9, 0.999], "eps": ADAM_EPS},
        "networks": {"latent": LATENT, "hidden": list(HIDDEN), "act": ACTIVATION},
        "max_epochs_per_stage": args.max_epochs_per_stage,
        "seed": args.seed,
    }


class RowRun:
    """A row's directory: ``state.json``, ``stageI.pt``, ``partial.pt``."""

    def __init__(self, folder: Path, settings: dict) -> None:
        self.folder, self.path = folder, folder / "state.json"
        if self.path.exists():
            self.state = json.loads(self.path.read_text())
            stored = self.state["settings"]
            changed = sorted(k for k in settings if stored.get(k) != settings[k])
            if changed:
                raise PyroVAEError(
                    f"{folder} was trained with other settings ({', '.join(changed)}: "
                    f"{[stored.get(k) for k in changed]}); use another --out"
                )
        else:
            self.state = {"settings": settings, "curve": [], "ais": None}

    @property
    def finished(self) -> int:
        """The last finished stage, -1 before any."""
        return max((e["stage"] for e in self.state["curve"]), default=-1)

    def checkpoint(self, stage: int) -> Path:
        return self.folder / f"stage{stage}.pt"

    def save(self) -> None:
        write_json(self.path, self.state)


def run_row(name: str, splits: Splits, args: argparse.Namespace, report) -> dict:
    """Train and evaluate ``name`` through stage ``args.stages``; its JSON entry."""
    spec = ROWS[name]
    device = splits.train.device
    run = RowRun(args.out / name, settings_of(name, args, splits))
    if spec.peer:
        learner = PythaeRow(spec, splits, device, args.seed, run.folder)
    else:
        learner = PyroVAERow(spec, splits, device, args.seed)
    if run.finished >= 0:
        learner.load(load_checkpoint(run.checkpoint(run.finished)))
    for stage in range(run.finished + 1, args.stages + 1):
        epochs = train_stage(run, learner, stage, args.max_epochs_per_stage)
        entry = stage_entry(stage, epochs, args.max_epochs_per_stage)
        k, n = (args.eval_k, args.eval_n)
        if stage < args.stages:  # a stage inside the curve, not this run's last
            k, n = (args.stage_eval_k or k, args.stage_eval_n or n)
        entry["test"] = evaluate(learner, splits.test[:n], k)
        entry["machine"] = {"device": str(device), "threads": torch.get_num_threads()}
        run.state["curve"].append(entry)
        run.save()
        print(f"{name}: {progress_line(entry)}", flush=True)
        report(name, row_entry(name, run.state))
    if args.ais and run.finished >= 0:
        ais = run.state["ais"]
        if not ais or (ais["stage"], ais["n"]) != (run.finished, args.ais):
            run.state["ais"] = cross_check(learner, splits.test[: args.ais], args)
            run.state["ais"]["stage"] = run.finished
            run.save()
    return row_entry(name, run.state)


def train_stage(run: RowRun, learner, stage: int, cap: int | None) -> list[dict]:
    """Train stage ``stage`` (from ``partial.pt`` if a stop cut it short); its
    epochs' statistics. Writes ``stageI.pt`` and removes ``partial.pt``."""
    done = sum(stage_epochs(i, cap) for i in range(stage))
    last = done + stage_epochs(stage, cap)
    if run.checkpoint(stage).exists():  # trained, stopped before its evaluation
        payload = load_checkpoint(run.checkpoint(stage))
        learner.load(payload)
        return payload["epochs"]
    partial, epochs = run.folder / "partial.pt", []
    if partial.exists():
        payload = load_checkpoint(partial)
        if payload["stage"] == stage:
            learner.load(payload)
            epochs = payload["epochs"]
    first = done + len(epochs) + 1

    def on_epoch(stats: dict) -> None:
        epochs.append(stats)
        payload = {**learner.state(stats["epoch"]), "stage": stage, "epochs": epochs}
        save_checkpoint(payload, partial)

    if first <= last:
        learner.train_epochs(first, last, stage_lr(stage), on_epoch)
    payload = {**learner.state(last), "stage": stage, "epochs": epochs}
    save_checkpoint(payload, run.checkpoint(stage))
    partial.unlink(missing_ok=True)
    return epochs


def stage_entry(stage: int, epochs: list[dict], cap: int | None) -> dict:
    seconds = [e["seconds"] for e in epochs]
    last = epochs[-1]
    return {
        "stage": stage,
        "epochs": sum(stage_epochs(i, cap) for i in range(stage + 1)),
        "stage_epochs": len(epochs),
        "lr": stage_lr(stage),
        "seconds_per_epoch": statistics.median(seconds),
        "train_seconds": sum(seconds),
        "train_elbo": last.get("train_elbo"),
        "valid_elbo": last.get("valid_elbo"),
        "train_loss": last.get("train_loss"),
    }


def evaluate(learner, x: torch.Tensor, k: int) -> dict:
    """Test −log p̂(x) by importance sampling with K draws per image."""
    model, guide = learner.programs()
    model.eval(), guide.eval()
    result = log_marginal(model, guide, x, k, seed=EVAL_SEED)
    try:
        check_consistency(result)
        consistent = "ELBO <= IWAE_k <= log p(x) holds"
    except EstimatorConsistencyError as err:  # record it; hours of training stay
        consistent = str(err)
    s = result.summary()
    return {
        "nll": -s["log_px"]["mean"],
        "se": s["log_px"]["se"],
        "elbo": s["elbo"]["mean"],
        "iwae": {g: v["mean"] for g, v in s["iwae"].items()},
        "k": k,
        "n": len(x),
        "khat_above_0.7": s["khat"]["fraction_above_0.7"],
        "seconds": s["seconds"],
        "consistency": consistent,
    }


def cross_check(learner, x: torch.Tensor, args: argparse.Namespace) -> dict:
    """AIS on the first N test images, beside IS on the same images."""
    model, guide = learner.programs()
    model.eval(), guide.eval()
    ais = ais_log_marginal(
        model, guide, x, steps=args.ais_steps, chains=args.ais_chains,
        leapfrog=args.ais_leapfrog, seed=EVAL_SEED,
    ).summary()  # fmt: skip
    is_ = evaluate(learner, x, args.eval_k)
    print(f"AIS on {len(x)} test images: NLL {-ais['log_px']['mean']:.2f}", flush=True)
    return {
        "n": len(x),
        "nll": -ais["log_px"]["mean"],
        "se": ais["log_px"]["se"],
        "settings": {k: ais[k] for k in ("steps", "chains", "leapfrog", "schedule")},
        "acceptance": ais["acceptance"]["mean"],
        "seconds": ais["seconds"],
        "is_nll_same_images": is_["nll"],
        "is_k": args.eval_k,
    }


def progress_line(e: dict) -> str:
    t = e["test"]
    return (
        f"stage {e['stage']} done ({e['epochs']} epochs, lr {e['lr']:.2e}, "
        f"{e['seconds_per_epoch']:.2f} s/epoch): test NLL {t['nll']:.2f} ± "
        f"{t['se']:.2f} (K = {t['k']}, n = {t['n']}, {t['seconds']:.0f} s)"
    )


def row_entry(name: str, state: dict) -> dict:
    spec = ROWS[name]
    curve = state["curve"]
    seconds = [e["seconds_per_epoch"] for e in curve]
    return {
        "row": name,
        "published": spec.published,
        "published_source": spec.source,
        "settings": state["settings"],
        "curve": curve,
        "ais": state["ais"],
        "seconds_per_epoch": statistics.median(seconds) if seconds else None,
    }


# --- report ----------------------------------------------------------------------


def markdown(rows: dict) -> str:
    lines = [
        "| row | stages done | epochs | NLL (ours) ± se | K, n | published | "
        "difference | s / epoch | 3280 epochs (h, training only) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | | | | |")
            continue
        if not r["curve"]:
            continue
        e, spe = r["curve"][-1], r["seconds_per_epoch"]
        t = e["test"]
        hours = sum(3**i for i in range(STAGES)) * spe / 3600
        lines.append(
            f"| {name} | 0–{e['stage']} | {e['epochs']} | {t['nll']:.2f} ± "
            f"{t['se']:.2f} | {t['k']}, {t['n']} | {r['published']:.2f} | "
            f"{t['nll'] - r['published']:+.2f} | {spe:.2f} | {hours:.1f} |"
        )
    stages = sorted({e["stage"] for r in rows.values() for e in r.get("curve", [])})
    if stages:
        lines += ["", "Learning curve, test NLL by stage (epochs so far):", ""]
        lines.append("| row | " + " | ".join(f"stage {s}" for s in stages) + " |")
        lines.append("|---" * (len(stages) + 1) + "|")
        for name, r in rows.items():
            by = {e["stage"]: e for e in r.get("curve", [])}
            cells = [
                f"{by[s]['test']['nll']:.2f} ({by[s]['epochs']})" if s in by else ""
                for s in stages
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ais = [(n, r["ais"]) for n, r in rows.items() if r.get("ais")]
    for name, a in ais:
        lines.append(
            f"\n{name}, stage {a['stage']}: AIS NLL {a['nll']:.2f} ± {a['se']:.2f} "
            f"on {a['n']} test images ({a['settings']['steps']} steps, "
            f"{a['settings']['chains']} chains); IS (K = {a['is_k']}) on the same "
            f"images {a['is_nll_same_images']:.2f}"
        )
    return "\n".join(lines)


def reporter(path: Path, meta: dict) -> Callable[[str, dict], None]:
    """Merge one row's entry into the JSON (rows of other runs stay), locked."""

    def report(name: str, entry: dict) -> None:
        with locked(path.with_name(path.name + ".lock"), wait=True):
            doc = json.loads(path.read_text()) if path.exists() else {"rows": {}}
            doc["meta"] = meta
            kept = doc["rows"].get(name, {})
            if not ("skipped" in entry and kept.get("curve")):  # keep real results
                doc["rows"][name] = entry
            doc["rows"] = {n: doc["rows"][n] for n in ROWS if n in doc["rows"]}
            doc["table"] = markdown(doc["rows"])
            write_json(path, doc)

    return report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=tuple(ROWS), default=["vae"])
    parser.add_argument(
        "--stages", type=int, default=3, help="run stages 0..I (7: all 3280 epochs)"
    )
    parser.add_argument("--dataset", choices=("mnist", "digits"), default="mnist")
    parser.add_argument("--mnist-dir", default="data", help="MNIST's IDX files")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_mnist"))
    parser.add_argument(
        "--json", type=Path, default=Path("benchmarks/results/bench_mnist.json")
    )
    parser.add_argument("--eval-k", type=int, default=5000, help="IS samples")
    parser.add_argument("--eval-n", type=int, default=10000, help="test images")
    parser.add_argument(
        "--stage-eval-k",
        type=int,
        help="K at the stages before --stages I (cheaper; default --eval-k)",
    )
    parser.add_argument(
        "--stage-eval-n", type=int, help="n at those stages (default --eval-n)"
    )
    parser.add_argument(
        "--max-epochs-per-stage",
        type=int,
        default=None,
        help="cap every stage's 3^i epochs (smoke runs; off in the protocol)",
    )
    parser.add_argument("--ais", type=int, default=0, help="AIS on N test images")
    parser.add_argument("--ais-steps", type=int, default=1000)
    parser.add_argument("--ais-chains", type=int, default=16)
    parser.add_argument("--ais-leapfrog", type=int, default=10)
    parser.add_argument("--install-pythae", action="store_true")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 <= args.stages < STAGES:
        parser.error(f"--stages must be 0..{STAGES - 1}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_default_dtype(torch.float32)
    pyro.settings.set(module_local_params=True)
    # train() traces the step anew at every stage; torch's deprecation note each time
    warnings.filterwarnings("ignore", r"`torch\.jit\.trace", FutureWarning)
    device = resolve_device(args.device)
    splits = load_data(args, device)
    meta = {
        "protocol": (
            f"{BURDA}: dynamic binarization, 2x200 tanh, z = 50, Bernoulli, batch "
            f"{BATCH}, Adam (0.9, 0.999, eps {ADAM_EPS}), stage i: 3^i epochs at "
            "1e-3 * 10^(-i/7); test binarized once (CPU generator, seed "
            f"{TEST_SEED}); NLL = -log p(x) by IS with K = eval_k on eval_n images"
        ),
        "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
        },
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
    }
    report = reporter(args.json, meta)
    peers = [n for n in args.rows if ROWS[n].peer]
    skip = ensure_pythae(args.install_pythae) if peers else None
    if skip:
        print(f"skipped {', '.join(peers)}: {skip}", flush=True)
    rows = {}
    for name in args.rows:
        if ROWS[name].peer and skip:
            rows[name] = {"row": name, "skipped": skip}
            report(name, rows[name])
            continue
        with locked(args.out / name / ".lock", wait=False):
            rows[name] = run_row(name, splits, args, report)
        report(name, rows[name])
    print(markdown(rows))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
