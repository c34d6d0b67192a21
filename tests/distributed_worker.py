"""One process of the distributed tests (tests/test_distributed.py starts two).

Run as ``python tests/distributed_worker.py TASK ...`` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set, as torchrun would set them:

* ``params OUT``: train a tiny VAE for two epochs on digits, save this rank's
  parameters and history to ``OUT/rank<R>.pt``;
* ``elbo OUT EPOCHS SEED...``: train one tiny VAE per seed, rank 0 writes the final
  validation ELBOs to ``OUT`` (JSON); :func:`valid_elbos` is the same code, and runs
  in one process when WORLD_SIZE is unset;
* ``nan-params OUT``: as ``params``, but process 1's loss turns NaN at its step 20
  (epoch 2); each process catches the NonFiniteLossError and saves its parameters
  and the error's message;
* ``fit FAULT RANK STEP ARGS...``: ``python -m pyro_vae.fit ARGS``, except that at its
  training step STEP, process RANK exits abruptly (FAULT ``exit``: ``os._exit(1)``) or
  its loss turns NaN (``nan``); FAULT ``none`` runs the command as it is.
"""

from __future__ import annotations

import json
import os
import sys

import pyro
import torch

from pyro_vae.cli.build import build_model_and_guide
from pyro_vae.cli.config import FitConfig
from pyro_vae.data import binarize_splits
from pyro_vae.data.sources import load_dataset

TINY = {"hidden": (64,), "latent_dim": 4}


def _context():
    from pyro_vae.training import distributed

    if not distributed.launched():
        return None
    return distributed.init_from_env(torch.device("cpu"), seed=0)


def _train(seed, epochs, ctx, batch_size=100, model_and_guide=None):
    from pyro_vae.training.loop import Schedule, TrainOptions, make_elbo, train

    pyro.settings.set(module_local_params=True)
    pyro.set_rng_seed(seed)
    if model_and_guide is None:
        model_and_guide = build_model_and_guide(FitConfig(**TINY), 64, (1, 8, 8))
    model, guide = model_and_guide
    model, guide = model.to(torch.float32), guide.to(torch.float32)
    splits = binarize_splits(load_dataset("digits"), "dynamic")
    if ctx is not None:
        ctx.seed = seed  # the shuffles follow the run's seed
        ctx.seed_rngs(seed, 0)
    history, _ = train(
        model,
        guide,
        splits,
        Schedule(epochs=epochs, batch_size=batch_size, lr=3e-3),
        elbo=make_elbo("trace"),
        options=TrainOptions(distributed=ctx),
    )
    return model, guide, history


def valid_elbos(seeds, epochs, ctx=None, batch_size=100):
    """The final validation ELBO (nats per datum) of one short run per seed."""
    return [_train(seed, epochs, ctx, batch_size)[2][-1].valid_elbo for seed in seeds]


def _nan_on_rank_1(step):
    """From process 1's ``step``-th loss on, the loss is NaN (it still has a graph)."""
    import pyro_vae.training.loop as train_module

    real_loss, calls = train_module._loss, [0]

    def faulty_loss(step_loss, x):
        calls[0] += 1
        loss = real_loss(step_loss, x)
        return loss * float("nan") if calls[0] >= step else loss

    if int(os.environ["RANK"]) == 1:
        train_module._loss = faulty_loss


def main(argv):
    task, *args = argv
    if task == "fit":
        fault, rank, step, *fit_args = args
        if fault != "none" and int(os.environ["RANK"]) == int(rank):
            import pyro_vae.training.loop as train_module

            real_loss, calls = train_module._loss, [0]

            def faulty_loss(step_loss, x):
                calls[0] += 1
                loss = real_loss(step_loss, x)
                if calls[0] == int(step):
                    if fault == "exit":
                        os._exit(1)  # no cleanup, no goodbye: as a crashed process
                    return loss * float("nan")
                return loss

            train_module._loss = faulty_loss
        from pyro_vae.cli.fit import main as fit_main

        return fit_main(fit_args)
    ctx = _context()
    try:
        if task == "params":
            model, guide, history = _train(0, 2, ctx)
            state = {
                "model": model.state_dict(),
                "guide": guide.state_dict(),
                "history": [vars(h) for h in history],
            }
            torch.save(state, os.path.join(args[0], f"rank{ctx.rank}.pt"))
        elif task == "nan-params":
            from pyro_vae.training.loop import NonFiniteLossError

            _nan_on_rank_1(20)
            pyro.settings.set(module_local_params=True)
            pyro.set_rng_seed(0)
            model, guide = build_model_and_guide(FitConfig(**TINY), 64, (1, 8, 8))
            try:
                _train(0, 3, ctx, model_and_guide=(model, guide))
                message = "no error"
            except NonFiniteLossError as err:
                message = str(err)
            state = {"model": model.state_dict(), "guide": guide.state_dict()}
            state["message"] = message
            torch.save(state, os.path.join(args[0], f"rank{ctx.rank}.pt"))
        elif task == "elbo":
            out, epochs, *seeds = args
            values = valid_elbos([int(s) for s in seeds], int(epochs), ctx)
            if ctx.is_main:
                with open(out, "w") as f:
                    json.dump(values, f)
        else:
            raise SystemExit(f"unknown task {task}")
    finally:
        ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
