r"""Data-parallel training on several processes: ``torchrun`` + DistributedDataParallel.

One model trains on ``W`` processes (``--devices N`` per node times ``--num-nodes M``),
each with its own shard of every epoch. Everything here ships with torch: the processes
are started by ``torchrun`` (``python -m torch.distributed.run``), which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``; they meet in a process group (``gloo`` on CPU, ``nccl`` on CUDA), and
:class:`torch.nn.parallel.DistributedDataParallel` averages the gradients. The Pyro
model and guide are plain ``nn.Module`` s (``module_local_params``), so DDP wraps them
as they are.

**Sharding.** Every epoch, :class:`torch.utils.data.DistributedSampler` draws one
permutation of the training indices from ``seed + epoch`` (the same on every process)
and deals it out: process ``r`` takes positions ``r, r + W, r + 2W, ...``. Local batch
``k`` of all processes together is then global batch ``k`` of that permutation, and
``--batch-size B`` stays the *global* batch: each process takes ``b = B / W`` data per
step (``B`` must divide by ``W``). When ``W`` does not divide ``N``, the sampler repeats
the first ``W - 1`` indices at most, so that every process takes the same number of
steps. Validation: each process scores a contiguous shard of the validation split and
the sums are added.

**Scaling rule.** With per-datum loss :math:`\ell(x) = -\mathrm{ELBO}(x)`, the full-data
objective is :math:`L = \sum_{n=1}^{N} \ell(x_n)`. The model's ``pyro.plate("data",
x.shape[0])`` has no subsampling scale, so process ``r``'s Pyro loss is
:math:`\sum_{x \in B_r} \hat\ell(x)` over its local batch :math:`B_r` of size ``b``,
and :func:`pyro_vae.training.loop.train` divides it by ``b``. DDP averages the gradients
over the ``W`` processes:

.. math::
    g = \frac{1}{W} \sum_{r=1}^{W} \frac{1}{b} \sum_{x \in B_r} \nabla \hat\ell(x)
      = \frac{1}{B} \sum_{x \in B} \nabla \hat\ell(x), \qquad B = \bigcup_r B_r,

the gradient of the mean per-datum loss over the global batch, exactly what one process
computes on the same ``B`` data. Since ``B`` is a uniformly random subset of the data,
:math:`E[N g] = \nabla L`: ``N`` times it is an unbiased estimate of the full-data
(negative) ELBO gradient, and training with ``W`` processes is the same stochastic
optimization as with one at the same global batch, so the learning rate stays as it is
(no "linear scaling" of Goyal et al., 2017, which applies when the global batch grows
with ``W``). References: P. Goyal et al., *Accurate, Large Minibatch SGD: Training
ImageNet in 1 Hour*, arXiv:1706.02677 (2017), section 2; S. Li et al., *PyTorch
Distributed: Experiences on Accelerating Data Parallel Training*, VLDB 13(12) (2020).
InfoVAE's MMD(q(z), p(z)) is estimated from each process's local batch (``b`` codes
against ``b`` prior draws), so its estimate is noisier than one from the global batch.

**Randomness.** All processes seed with ``--seed`` and build identical networks (DDP
also broadcasts rank 0's weights once); after that each process re-seeds its own
generators from ``(seed, rank, start_epoch)``, so that the z draws and the dynamic
binarizations of different processes are independent.

**Agreement without extra round trips.** The module DDP wraps carries two extra
scalars whose gradients are the step's loss and a stop request; DDP averages them with
the real gradients, so after ``backward()`` every process knows, at no extra
collective, whether any process saw a non-finite loss (then no process takes the step)
or caught SIGINT/SIGTERM (then all stop after the same step). On CUDA they are read
every :data:`pyro_vae.training.loop.SYNC_EVERY` steps, as the single-process loop
checks.

**Failures.** Every collective has a timeout (:func:`collective_timeout`, default
:data:`DEFAULT_TIMEOUT_S` seconds, ``PYRO_VAE_DIST_TIMEOUT`` overrides it). A process
that dies or hangs makes the others fail with :class:`DistributedError`, which names
the processes found gone and how to resume; checkpoints are written by rank 0 only,
atomically (:mod:`pyro_vae.training.checkpoint`).

Its modules, one concern each: :mod:`~pyro_vae.training.distributed.launch` (starting
the processes through ``torchrun``), :mod:`~pyro_vae.training.distributed.context`
(joining the
process group, and the collectives training needs),
:mod:`~pyro_vae.training.distributed.failures` (timeouts, and telling a lost process
from a bug) and :mod:`~pyro_vae.training.distributed.replica` (the module DDP wraps).
This package
imports neither :mod:`pyro_vae.models` nor :mod:`pyro_vae.guides`.
"""

from pyro_vae.training.distributed.context import DistContext, init_from_env
from pyro_vae.training.distributed.failures import (
    DEFAULT_TIMEOUT_S,
    DistributedError,
    collective_timeout,
)
from pyro_vae.training.distributed.launch import (
    cpu_cores,
    launch,
    launch_command,
    launched,
    needs_launch,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistContext",
    "DistributedError",
    "collective_timeout",
    "cpu_cores",
    "init_from_env",
    "launch",
    "launch_command",
    "launched",
    "needs_launch",
]
