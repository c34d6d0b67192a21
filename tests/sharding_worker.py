"""One process of the sharded-evaluation tests (tests/test_sharding.py starts two).

Run as ``python tests/sharding_worker.py TASK OUT`` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set, as torchrun would set them:

* ``equal OUT``: each process computes its shard of importance sampling (7 data,
  shards aligned to 3), of AIS (7 data, align 2) and of importance sampling on 2
  data (align 3: rank 0's shard is empty) on the pPCA oracle; rank 0 saves the
  merged per-datum results to ``OUT`` (torch.save). :func:`evaluate` is the same
  code, and runs in one process with ``ctx=None``;
* ``raise OUT`` / ``die OUT``: as ``equal``, but process 1's importance sampling
  raises a ValueError, or exits abruptly (``os._exit(1)``); each process writes
  its error to ``OUT.rank<R>``.
"""

from __future__ import annotations

import os
import sys

import pyro
import torch

from pyro_vae.cli.sharding import sharded
from pyro_vae.evaluate.ais import ais_log_marginal
from pyro_vae.evaluate.marginal import log_marginal
from pyro_vae.models.linear_gaussian import LinearGaussian, PosteriorGuide

N, K, SEED = 7, 40, 11
AIS = {"steps": 4, "chains": 3, "leapfrog": 2, "data_chunk": 2}


def problem():
    """The pPCA model, a poor guide and N data, float64, from a fixed seed."""
    torch.set_default_dtype(torch.float64)
    pyro.settings.set(module_local_params=True)
    pyro.enable_validation(True)
    torch.manual_seed(0)
    model = LinearGaussian(torch.randn(5, 2), torch.randn(5), 0.5)
    x = model.sample(N).detach()
    return model, PosteriorGuide(model, shift=0.5, scale=0.7), x


def evaluate(ctx, fault=None):
    """Per-datum IS and AIS results, merged on rank 0 (all of them with no ctx)."""
    model, guide, x = problem()

    def importance(lo, hi):
        if fault is not None and ctx.rank == 1:
            if fault == "die":
                os._exit(1)  # no cleanup, no goodbye: as a crashed process
            raise ValueError("a bug in shard 1")
        return log_marginal(
            model, guide, x[lo:hi], K, data_chunk=3, seed=SEED, index_offset=lo
        )

    def ais(lo, hi):
        return ais_log_marginal(
            model, guide, x[lo:hi], **AIS, seed=SEED, index_offset=lo
        )

    def few(lo, hi):  # 2 data, align 3: one shard of 2 data, the other empty
        return log_marginal(
            model, guide, x[lo:hi], K, data_chunk=3, seed=SEED + 1, index_offset=lo
        )

    is_ = sharded(ctx, importance, N, align=3)
    ais_ = sharded(ctx, ais, N, align=2)
    few_ = sharded(ctx, few, 2, align=3)
    if is_ is None:
        return None
    return {
        "is": _per_datum(is_),
        "ais": {
            name: getattr(ais_, name)
            for name in ("log_px", "log_px_se", "log_weights", "acceptance")
        }
        | {"step_sizes": ais_.step_sizes},
        "few": _per_datum(few_),
        "chunks": {"is": is_.chunks, "ais": ais_.chunks, "few": few_.chunks},
    }


def _per_datum(result):
    fields = ("log_px", "log_px_se", "elbo", "elbo_se", "gap_se", "khat", "ess")
    out = {name: getattr(result, name) for name in fields}
    for g in result.iwae:
        out[f"iwae{g}"], out[f"iwae_se{g}"] = result.iwae[g], result.iwae_se[g]
    return out


def main(argv):
    from pyro_vae.training import distributed

    task, out = argv
    ctx = distributed.init_from_env(torch.device("cpu"), seed=0)
    try:
        if task == "equal":
            merged = evaluate(ctx)
            if ctx.is_main:
                torch.save(merged, out)
        else:
            try:
                evaluate(ctx, fault=task)
                message = "no error"
            except Exception as err:  # noqa: BLE001 - the test reads it
                message = f"{type(err).__name__}: {err}"
            with open(f"{out}.rank{ctx.rank}", "w") as f:
                f.write(message)
    finally:
        ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
