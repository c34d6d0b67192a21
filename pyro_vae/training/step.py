"""The training step's loss and optimizer, made fast without changing what they compute.

Pyro adds a fixed Python cost to every step: it runs the model and guide under
poutine handlers, builds two traces and walks them. On a small network that cost is as
large as the network itself (benchmarks/README.md). Three measures remove most of it,
and each leaves the numbers as they were, up to float rounding:

* **validation once**: the first step runs with Pyro's (and torch.distributions')
  argument and support checks on; later steps run with them off. The data were
  checked up front, and a NaN still stops training (:mod:`pyro_vae.training.loop`).
* **one trace per batch shape**: :class:`StepLoss` records the loss
  ``elbo.differentiable_loss(model, guide, x)`` once per input shape with
  :func:`torch.jit.trace` and replays that graph. The random draws are recorded as
  random ops, so every replay draws fresh z from torch's generator, in the same order
  as the eager program; the RNG is rewound after tracing, so the traced run consumes
  exactly the draws the eager run would. Gradients are the eager ones bit for bit (in
  float64; in float32 the VampPrior's float64 matrix products may round differently,
  ~1e-7 relative); the
  reported loss is summed in float32 on the graph rather than as Python floats, so it
  can differ from Pyro's eager value in the last digit (see
  :func:`_items_stay_tensors`). The graph runs in TorchScript's plain
  interpreter (``optimized_execution(False)``): its optimizing executor rewrites the
  backward pass and changes gradients in the last bits, while the plain interpreter
  gives the eager gradients bit for bit (tests/test_step.py), at the same speed here.
* **fused Adam** (:func:`make_optimizer`): one kernel updates every parameter.

**What is traced.** A traced graph freezes every Python value the loss read while
it was recorded. By default (``jit="auto"``) :class:`StepLoss` traces only losses
made of known code, the registries' parts and torch's and Pyro's modules, and keys
each graph by the Python state that code reads (:mod:`pyro_vae.training.trace_guard`); a
model or guide of a user's own class runs eagerly, as in plain Pyro, so a KL weight
it reads from ``self`` is read on every step. ``jit=True`` traces any model (the
user vouches for it); ``jit=False`` (``--no-jit``) never traces.

**The deprecation.** Recent torch (2.14 here) deprecates ``torch.jit.trace`` in
favour of ``torch.compile`` and ``torch.export``; its FutureWarning is passed on as
torch raised it. ``torch.compile`` was measured as the replacement and lost: the
compiled ELBO module takes 6.6 ms a step against the trace's 3.9 (batch 128, 2-core
CPU, benchmarks/results/bench_train.json), because Pyro's messengers break its graph
a dozen times per step. Pyro's own ``JitTrace_ELBO`` is ``torch.jit.trace`` too
(5.6 ms there, without fused Adam). Should the trace disappear or fail on a model,
:class:`StepLoss` warns once and runs the loss eagerly.

This module imports neither :mod:`pyro_vae.models` nor :mod:`pyro_vae.guides`.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import pyro
import torch
from pyro.infer import util as pyro_util

from pyro_vae.rng import forked_rng
from pyro_vae.training.trace_guard import python_state, untraceable_reason

__all__ = ["StepLoss", "make_optimizer"]


class StepLoss:
    """Call ``loss_fn(x)`` the fast way: validated once, then traced per shape.

    Args:
        loss_fn: a module mapping a batch to a scalar loss, e.g. Pyro's
            ``Trace_ELBO()(model, guide)``.
        jit: ``"auto"`` (the default) traces only where a replay means what eager
            Pyro means (:mod:`pyro_vae.training.trace_guard`: the registries' parts,
            torch's and Pyro's modules, guarded by their Python state) and runs any
            other
            code eagerly; ``True`` traces whatever the model is (the user vouches
            that it reads no Python state that changes); ``False`` never traces.
            Every mode validates the first call only.

    Attributes:
        eager_reason: why ``"auto"`` chose to run eagerly, or None while it traces.
    """

    #: traces of one batch shape under different Python states before giving up
    MAX_STATES = 8

    def __init__(self, loss_fn: torch.nn.Module, *, jit: bool | str = "auto") -> None:
        if jit not in ("auto", True, False):
            raise ValueError(f"jit must be 'auto', True or False, got {jit!r}")
        self.loss_fn = loss_fn
        self.validated = False
        self._graphs: dict[tuple, torch.jit.ScriptModule] = {}
        self._guarded = jit == "auto"
        self.eager_reason = None if jit else "jit=False"
        if jit == "auto":
            self.eager_reason = untraceable_reason(loss_fn)
        self.jit = self.eager_reason is None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.validated:
            self.validated = True
            if not self.jit:
                with pyro.validation_enabled(True):
                    return self.loss_fn(x)
            # Validate on a rewound RNG, then trace and run on the same draws: every
            # reported loss then comes from the graph, also on a resumed run.
            with pyro.validation_enabled(True), forked_rng(x):
                self.loss_fn(x)
        with pyro.validation_enabled(False):
            key = self._key(x) if self.jit else None
            if key is None:
                return self.loss_fn(x)
            if key not in self._graphs:
                graph = self._trace(x)
                if graph is None:
                    return self.loss_fn(x)
                self._graphs[key] = graph
            with torch.jit.optimized_execution(False):
                return self._graphs[key](x)

    def _key(self, x: torch.Tensor) -> tuple | None:
        """The graph's key: shape, dtype, device and (guarded) the Python state.

        None when the step must run eagerly from now on.
        """
        shape = (tuple(x.shape), x.dtype, x.device)
        if not self._guarded:
            return shape
        try:
            key = (*shape, python_state(self.loss_fn))
        except Exception as err:  # noqa: BLE001 - the tree changed: unknown code
            self.jit, self.eager_reason = False, str(err)
            return None
        if key not in self._graphs:
            same_shape = sum(k[:3] == shape for k in self._graphs)
            if same_shape >= self.MAX_STATES:
                self.jit = False
                self.eager_reason = (
                    f"the Python state the loss reads changed {same_shape} times"
                )
                warnings.warn(
                    f"{self.eager_reason}: a new trace for each would be slower than "
                    "Pyro's eager step, which now runs every step",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return None
        return key

    def _trace(self, x: torch.Tensor) -> torch.jit.ScriptModule | None:
        try:
            with forked_rng(x), _items_stay_tensors():
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    graph = torch.jit.trace(self.loss_fn, (x,), check_trace=False)
        except Exception as err:  # noqa: BLE001 - any failure means: run eagerly
            self.jit = False
            reason = (str(err).splitlines() or [""])[0]
            self.eager_reason = f"torch.jit.trace failed: {reason}"
            warnings.warn(
                f"torch.jit.trace could not record this loss ({type(err).__name__}: "
                f"{reason}); training continues without it, at Pyro's eager speed. "
                "Pass --no-jit to skip the attempt.",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        _pass_on(caught)
        return graph


_TRACE_LOCK = threading.Lock()
_SEEN: dict = {}  # warn_explicit's registry: torch's notes once per place, as usual


def _pass_on(caught: list[warnings.WarningMessage]) -> None:
    """Pass on what the tracer caught, but for its notes on torch's and Pyro's code.

    Warnings other than the tracer's (torch's FutureWarning that ``torch.jit.trace``
    is deprecated, a user's own) go on as they were raised. A TracerWarning from
    the user's model or guide (a Python ``if`` on a tensor, a ``.item()``) means the
    trace froze a value (possible only with ``jit=True``): it becomes a RuntimeWarning
    that says so. The ones torch, Pyro and pyro_vae raise in their own code branch on
    shapes (fixed per trace) or re-check data already checked, and are dropped.
    """
    packages = ("torch", "pyro", "pyro_vae", "pyro_vae.models", "pyro_vae.guides")
    homes = tuple(
        os.path.dirname(os.path.abspath(sys.modules[name].__file__))
        for name in packages
        if getattr(sys.modules.get(name), "__file__", None)
    )
    named = False
    for w in caught:
        if not issubclass(w.category, torch.jit.TracerWarning):
            warnings.warn_explicit(
                w.message, w.category, w.filename, w.lineno, registry=_SEEN
            )
        elif not named and not any(
            os.path.abspath(w.filename).startswith(home) for home in homes
        ):
            named = True
            warnings.warn(
                f"the traced loss froze a Python value at {w.filename}:{w.lineno} "
                f"({w.message}); if the model or guide branches on data values, "
                "train with --no-jit (jit=False)",
                RuntimeWarning,
                stacklevel=4,
            )


def _detach(value: object) -> object:
    return value.detach() if isinstance(value, torch.Tensor) else value


@contextmanager
def _items_stay_tensors() -> Iterator[None]:
    """While tracing, Pyro's ``torch_item`` detaches instead of calling ``.item()``.

    Pyro's losses report ``loss + (surrogate - torch_item(surrogate))`` with the
    reported part summed as Python floats. Under :func:`torch.jit.trace` those floats
    would be frozen into the graph as constants, and every replay would report the
    first batch's value plus a difference. Detached tensors keep the value live (what
    Pyro's own TraceMeanField_ELBO does when it sees the tracer); the gradient, which
    flows through the surrogate, is untouched. Every loaded module that imported
    ``torch_item`` (Pyro's ELBOs, InfoVAE, a user's loss) is patched for the trace;
    a lock keeps two traces from overlapping. While a trace runs, another thread's
    Pyro ``loss()`` would also get tensors back: trace before sharing a model.
    """
    original = pyro_util.torch_item  # its home module stays unpatched, for imports
    with _TRACE_LOCK:
        patched = [
            module
            for module in list(sys.modules.values())
            if module is not pyro_util
            and getattr(module, "__dict__", {}).get("torch_item") is original
        ]
        for module in patched:
            module.torch_item = _detach
        try:
            yield
        finally:
            for module in patched:
                module.torch_item = original


def make_optimizer(
    params: Iterable[torch.nn.Parameter], lr: float, *, eps: float = 1e-8
) -> torch.optim.Adam:
    """Adam, fused into one kernel where torch has one for these parameters.

    Fused Adam computes the same update as the default (for-each) Adam up to float
    rounding; on the 2-core CPU it makes a batch-128 step about a quarter faster.
    ``eps`` is Adam's ε (torch's default 1e-8; Burda et al. 2016 train with 1e-4,
    benchmarks/bench_mnist.py).
    """
    params = list(params)
    devices = {p.device.type for p in params}
    fused = devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, eps=eps, fused=fused or None)
