"""When a traced loss means what the eager one means, and what it depends on.

:func:`torch.jit.trace` records the tensor operations of one call; every Python value
the model, guide or loss read during that call (a float weight, a flag, a branch) is
frozen into the graph. Eager Pyro reads them again on every call. The fast step
(:mod:`pyro_vae.training.step`) therefore replays a graph only where both agree:

* **Known code only.** Every class in the loss module's tree, its ELBO, and each
  callable they hold, is pyro_vae's own (the registries' parts), torch's or Pyro's,
  down the whole method resolution order. A user's class, a subclass of ours, a
  lambda or a forward hook is code whose reads nobody has checked: the step runs it
  eagerly (unless the user asks for the trace, ``jit=True``).
* **Guarded by its Python state.** Known code reads Python state only through plain
  attributes (numbers, strings, flags, tuples of them; ``tests/test_trace_guard.py``
  pins that for every registry part). :func:`python_state` collects them, with the
  identity and version of any plain tensor attribute; a change of that key (a user
  sets ``likelihood.sigma``, or switches ``train()``/``eval()``) makes the step trace
  again rather than replay a stale graph.

The values of buffers and parameters are not part of the key: the graph reads them
anew on every replay, so in-place updates (Adam's, or a KL weight's ``fill_``) are
seen. Which tensors they are is: one replaced by a new tensor
(``module.loc = torch.zeros(...)``, ``load_state_dict(assign=True)``) makes a new
trace. A global module hook (``register_module_forward_hook``) is unknown code: the
step runs eagerly while one is registered. Note that a trace does not record
``torch.no_grad()`` blocks: known code must not rely on them for gradients.

This module imports neither :mod:`pyro_vae.models` nor :mod:`pyro_vae.guides`.
"""

from __future__ import annotations

import types
from collections.abc import Hashable
from typing import Any

import torch

__all__ = ["KNOWN_PACKAGES", "python_state", "untraceable_reason"]

#: packages whose classes and functions read no Python state but their attributes
KNOWN_PACKAGES = ("torch", "pyro", "pyro_vae")
_PLAIN = (
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    type(None),
    range,
    torch.dtype,
    torch.device,
    torch.Size,
)
_MODULE_INTERNALS = {
    "_parameters",
    "_buffers",
    "_modules",
    "_non_persistent_buffers_set",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
    "_pyro_name",
    "_pyro_context",
    "_pyro_params",
    "_pyro_samples",
    "_pyro_frames",
}
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)
_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)


class _Unknown(Exception):
    """Raised inside the walk: the tree holds code of unknown meaning."""


#: bases that carry no behaviour of their own (abstract-class and typing markers)
_MARKERS = ("abc", "typing", "builtins", "collections.abc")


def _known(cls: type) -> bool:
    return all(
        c.__module__ in _MARKERS or c.__module__.split(".")[0] in KNOWN_PACKAGES
        for c in cls.__mro__
    )


def untraceable_reason(loss_fn: torch.nn.Module) -> str | None:
    """Why replaying a trace of ``loss_fn`` could differ from eager Pyro, or None.

    ``loss_fn`` is an ELBO module, ``elbo(model, guide)``.
    """
    try:
        python_state(loss_fn)
    except _Unknown as err:
        return str(err)
    return None


def python_state(loss_fn: torch.nn.Module) -> tuple[Hashable, ...]:
    """The Python values a call of ``loss_fn`` can read, as a hashable key.

    Raises:
        _Unknown: where the tree holds code this module cannot vouch for (see
            :func:`untraceable_reason`).
    """
    if any(getattr(torch.nn.modules.module, hooks, None) for hooks in _GLOBAL_HOOKS):
        raise _Unknown("a global module hook is registered (torch.nn.modules.module)")
    modules = list(loss_fn.named_modules())
    owners = {id(m) for _, m in modules}
    lifted = {
        id(t)
        for _, m in modules
        for t in (*m._parameters.values(), *m._buffers.values())
        if t is not None
    }
    key: list[Hashable] = []
    for name, module in modules:
        where = name or type(loss_fn).__name__
        if not _known(type(module)):
            raise _Unknown(f"{where} is a {_qualname(type(module))}")
        if any(getattr(module, hooks, None) for hooks in _HOOKS):
            raise _Unknown(f"{where} has a forward or backward hook")
        # which tensors the graph holds: a parameter or buffer replaced by a new
        # tensor (not updated in place) needs a new trace
        key.append(tuple((n, id(t)) for n, t in module._parameters.items()))
        key.append(tuple((n, id(t)) for n, t in module._buffers.items()))
        for attr, value in vars(module).items():
            if attr in _MODULE_INTERNALS:
                continue
            key.append((attr, _value(value, f"{where}.{attr}", owners, lifted, 0)))
    return tuple(key)


def _value(
    value: Any, where: str, owners: set[int], lifted: set[int], depth: int
) -> Hashable:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, slice):  # not hashable before Python 3.12
        return ("slice", value.start, value.stop, value.step)
    if isinstance(value, torch.Tensor):
        if id(value) in lifted:  # a buffer or parameter: read anew by the graph
            return "lifted"
        return ("tensor", id(value), value._version)
    if isinstance(value, torch.nn.Module):  # walked as a module of the tree
        if id(value) not in owners:
            raise _Unknown(f"{where} is a module outside the loss's tree")
        return ("module", id(value))
    if isinstance(value, tuple | list | frozenset) and depth < 4:
        return tuple(_value(v, where, owners, lifted, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 4:
        return tuple(
            (
                _value(k, where, owners, lifted, depth + 1),
                _value(v, f"{where}[{k!r}]", owners, lifted, depth + 1),
            )
            for k, v in value.items()
        )
    if isinstance(value, types.MethodType):
        owner = value.__self__
        if id(owner) in owners and _known(type(owner)):
            return ("method", id(owner), value.__func__.__qualname__)
        raise _Unknown(f"{where} is a method of {_qualname(type(owner))}")
    if isinstance(value, types.FunctionType | types.BuiltinFunctionType):
        if (value.__module__ or "").split(".")[0] in KNOWN_PACKAGES and (
            "<lambda>" not in value.__qualname__
            and "<locals>" not in value.__qualname__
        ):
            return ("function", value.__module__, value.__qualname__)
        raise _Unknown(f"{where} is the function {value.__qualname__}")
    if isinstance(value, type):
        if _known(value):
            return ("class", id(value))
        raise _Unknown(f"{where} is the class {_qualname(value)}")
    if _known(type(value)) and hasattr(value, "__dict__") and depth < 4:
        fields = sorted(vars(value).items())
        return (
            _qualname(type(value)),
            tuple(
                (k, _value(v, f"{where}.{k}", owners, lifted, depth + 1))
                for k, v in fields
            ),
        )
    raise _Unknown(f"{where} is a {_qualname(type(value))}")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
