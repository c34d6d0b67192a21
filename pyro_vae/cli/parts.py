"""Parts by name: the registries, parts of one's own, and the options each part takes.

A prior, likelihood or guide is named in a :class:`~pyro_vae.cli.config.FitConfig` (and
on the command line) either

* by a registry name: ``normal``, ``gaussian``, ``flow``, ... (:data:`REGISTRIES`),
  including names added in this process by :func:`register_prior`,
  :func:`register_likelihood` or :func:`register_guide`; or
* by an import path ``PACKAGE.MODULE:FACTORY``: a function or class of one's own,
  imported when the parts are built. The path is the config's value, so
  ``config.json`` and the checkpoint keep it, and ``fit --resume``,
  :func:`pyro_vae.load` and ``python -m pyro_vae.evaluate`` rebuild the part from it
  (the module must be importable there too: installed, or on ``PYTHONPATH``).

Every factory, registered or imported, is called with keywords only: the builder
offers the keyword set of its kind (:data:`KEYWORDS`) and passes the factory the
ones its signature names, or all of them when it takes ``**options``:

========== ==================================================================
prior      ``latent_dim``, ``data_dim``, ``posterior`` (the guide's
           ``posterior(x)``), ``components``, ``pseudo_inputs``, ``df``
likelihood ``data_dim``, ``latent_dim``, ``sigma``, ``sigma_floor``
guide      ``make_encoder`` (``make_encoder(out_features)`` builds the encoder
           network of ``--arch``), ``latent_dim``, ``data_dim``, ``rank``,
           ``flow_steps``, ``hidden``, ``activation``
========== ==================================================================

What the factory must return: a prior, a module whose ``forward()`` returns p(z)
with event_dim 1 (or such a distribution); a likelihood, a module mapping decoder
output to p(x|z) with ``params_per_feature`` and ``check_data(x)`` (subclass
:class:`pyro_vae.models.AbstractLikelihood`); a guide, a module whose ``forward(x)``
samples ``"z"`` and whose ``posterior(x)`` returns q(z|x) (see
:mod:`pyro_vae.guides`). Anything else, an import that fails, or a factory that
cannot be called with these keywords is a one-line :class:`ConfigError`.

Options (:data:`OPTIONS`: the flags that belong to one kind of part, such as
``--components``) are checked against what the chosen part takes:
:func:`check_options` refuses an option the user gave that the part does not take,
with the list of what it takes. The command line checks the flags given; a
:class:`FitConfig` made in Python is a full table of values and is not refused for
them. The registries' own factories name their options in their signatures; called
directly they also accept, and drop, the other keywords of their kind (as the
builder once passed them), and refuse any other keyword.

This module imports both :mod:`pyro_vae.models` and :mod:`pyro_vae.guides`: like
:mod:`pyro_vae.cli.build`, it is assembly code.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from torch import nn
from torch.distributions import Distribution

from pyro_vae.errors import ConfigError
from pyro_vae.guides import GUIDE_KEYWORDS, GUIDES
from pyro_vae.models import LIKELIHOODS, PRIORS
from pyro_vae.models.likelihoods import LIKELIHOOD_KEYWORDS
from pyro_vae.models.priors import PRIOR_KEYWORDS

if TYPE_CHECKING:
    from pyro_vae.cli.config import FitConfig

__all__ = [
    "KEYWORDS",
    "KINDS",
    "OPTIONS",
    "REGISTRIES",
    "call_factory",
    "check_names",
    "check_options",
    "register_guide",
    "register_likelihood",
    "register_prior",
    "resolve",
    "takes",
]

F = TypeVar("F", bound=Callable[..., Any])

KINDS = ("prior", "likelihood", "guide")

#: kind -> the registry of its names (the very dicts of models and guides)
REGISTRIES: dict[str, dict[str, Callable[..., Any]]] = {
    "prior": PRIORS,
    "likelihood": LIKELIHOODS,
    "guide": GUIDES,
}

#: kind -> the keywords the builder offers a factory of that kind
KEYWORDS: dict[str, tuple[str, ...]] = {
    "prior": PRIOR_KEYWORDS,
    "likelihood": LIKELIHOOD_KEYWORDS,
    "guide": GUIDE_KEYWORDS,
}

#: kind -> its options: config fields that only some parts of that kind take
OPTIONS: dict[str, tuple[str, ...]] = {
    "prior": ("components", "pseudo_inputs", "df"),
    "likelihood": ("sigma", "sigma_floor"),
    "guide": ("rank", "flow_steps"),
}

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_IMPORT_PATH = re.compile(f"{_DOTTED}:{_DOTTED}")


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _names(kind: str) -> str:
    return ", ".join(sorted(REGISTRIES[kind]))


def check_names(cfg: FitConfig) -> None:
    """Each part's name is a registry name or ``PACKAGE.MODULE:FACTORY``; no import.

    Raises :class:`ConfigError`, listing the registry's names, otherwise.
    """
    for kind in KINDS:
        name = getattr(cfg, kind)
        if not isinstance(name, str):
            raise ConfigError(f"{kind} must be a name, got {type(name).__name__}")
        if name in REGISTRIES[kind] or _IMPORT_PATH.fullmatch(name):
            continue
        if ":" in name:
            raise ConfigError(
                f"{kind} {name!r} is not an import path PACKAGE.MODULE:FACTORY (e.g. "
                f"mypackage.parts:my_{kind.replace('-', '_')})"
            )
        raise ConfigError(
            f"unknown {kind} {name!r}; choose one of: {_names(kind)}, or give a "
            f"factory of your own as PACKAGE.MODULE:FACTORY"
        )


def resolve(kind: str, name: str) -> Callable[..., Any]:
    """The factory ``name`` stands for: a registry entry, or the imported object.

    Raises :class:`ConfigError` (one line, naming ``name`` and the fix) for an
    unknown name, a module that fails to import, a missing attribute or an object
    that cannot be called.
    """
    registry = REGISTRIES[kind]
    if name in registry:
        return registry[name]
    if not _IMPORT_PATH.fullmatch(name):
        raise ConfigError(
            f"unknown {kind} {name!r}; choose one of: {_names(kind)}, or give a "
            f"factory of your own as PACKAGE.MODULE:FACTORY"
        )
    module_name, attr = name.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # any failure inside the user's module: say so briefly
        raise ConfigError(
            f"{kind} {name!r}: cannot import module {module_name!r} "
            f"({_one_line(err)}); install it or put its folder on PYTHONPATH"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"{kind} {name!r}: module {module_name!r} has no attribute {attr!r}; "
                f"name a function or class defined there"
            ) from None
    if not callable(obj):
        raise ConfigError(
            f"{kind} {name!r} is a {type(obj).__name__}, not a factory; name a "
            f"function or class that returns the {kind}"
        )
    return obj


def takes(factory: Callable[..., Any]) -> tuple[tuple[str, ...], bool]:
    """The keywords ``factory`` names, and whether it takes any (``**options``).

    A registry entry reports the signature of the function it wraps.
    """
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read: offer everything
        return (), True
    names = tuple(
        p.name
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )
    return names, any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())


def _takes_text(factory: Callable[..., Any]) -> str:
    names, any_ = takes(factory)
    listed = ", ".join(names) or "no options"
    return f"{listed} and any other keyword" if any_ else listed


def check_options(cfg: FitConfig, given: Mapping[str, Any] | None = None) -> None:
    """Resolve each part, and refuse one that the builder's keywords cannot call or
    a given option that the chosen part does not take.

    Args:
        cfg: the config naming the parts.
        given: the config fields the user set explicitly (the flags given on the
            command line); options in it that the chosen part does not take are
            refused with the list of what it takes. Every part is resolved (and a
            module of one's own imported) either way.
    """
    given = {} if given is None else given
    for kind in KINDS:
        name = getattr(cfg, kind)
        factory = resolve(kind, name)
        names, any_ = takes(factory)
        offered = KEYWORDS[kind] if any_ else [k for k in KEYWORDS[kind] if k in names]
        _check_callable(kind, name, factory, dict.fromkeys(offered))
        for option in OPTIONS[kind]:
            if option not in given or any_ or option in names:
                continue
            owners = [n for n, f in REGISTRIES[kind].items() if option in takes(f)[0]]
            whose = "is not an option of any registered " + kind
            if owners:
                plural = "s" if len(owners) > 1 else ""
                whose = f"is an option of the {', '.join(owners)} {kind}{plural}"
            raise ConfigError(
                f"{_flag(option)} {whose}; the {name} {kind} takes: "
                f"{_takes_text(factory)}. Drop {_flag(option)} or choose a {kind} "
                "that takes it"
            )


def call_factory(kind: str, name: str, **keywords: Any) -> Any:
    """Build the part ``name`` of ``kind`` from the builder's ``keywords``.

    The factory gets the keywords its signature names (all of them if it takes
    ``**options``). The result is checked to be the kind of part asked for.
    """
    factory = resolve(kind, name)
    names, any_ = takes(factory)
    passed = keywords if any_ else {k: v for k, v in keywords.items() if k in names}
    _check_callable(kind, name, factory, passed)
    part = factory(**passed)
    _check_part(kind, name, part)
    return part


def _check_callable(
    kind: str, name: str, factory: Callable[..., Any], passed: Mapping[str, Any]
) -> None:
    """Refuse a factory that the keywords ``passed`` cannot call (one line)."""
    try:
        inspect.signature(factory).bind(**passed)
    except TypeError as err:
        raise ConfigError(
            f"the {kind} factory {name!r} cannot be called with the keywords the "
            f"builder passes ({err}); it may take: {', '.join(KEYWORDS[kind])}, "
            "each by keyword (give the others defaults)"
        ) from None
    except ValueError:  # no signature to check: call and see
        pass


def _check_part(kind: str, name: str, part: Any) -> None:
    what = type(part).__name__
    if kind == "prior":
        if isinstance(part, (nn.Module, Distribution)):
            return
        need = "a module whose forward() returns p(z) with event_dim 1 (or such a "
        need += "distribution)"
    elif kind == "likelihood":
        if (
            isinstance(part, nn.Module)
            and isinstance(getattr(part, "params_per_feature", None), int)
            and callable(getattr(part, "check_data", None))
        ):
            return
        need = "a module mapping decoder output to p(x|z) with params_per_feature and "
        need += "check_data(x): subclass pyro_vae.models.AbstractLikelihood"
    else:
        if isinstance(part, nn.Module) and callable(getattr(part, "posterior", None)):
            return
        need = "a module whose forward(x) samples 'z' and whose posterior(x) returns "
        need += "q(z|x) (see pyro_vae.guides)"
    raise ConfigError(
        f"the {kind} factory {name!r} returned a {what}; it must return {need}"
    )


def _register(kind: str, name: str, factory: F | None, replace: bool) -> Any:
    registry = REGISTRIES[kind]

    def add(factory: F) -> F:
        if not isinstance(name, str) or not re.fullmatch(r"[\w.+-]+", name):
            raise ValueError(
                f"a {kind} name is letters, digits, '_', '-', '.' or '+' (no ':', "
                f"which marks an import path), got {name!r}"
            )
        if not callable(factory):
            raise TypeError(
                f"register_{kind} takes a callable factory, got {factory!r}"
            )
        if name in registry and registry[name] is not factory and not replace:
            raise ValueError(
                f"the {kind} {name!r} is registered already; pick another name or "
                "pass replace=True"
            )
        registry[name] = factory
        return factory

    return add if factory is None else add(factory)


def register_prior(
    name: str, factory: F | None = None, *, replace: bool = False
) -> Any:
    """Add ``factory`` to the priors as ``name``; usable as a decorator.

    ``name`` then works as ``FitConfig(prior=name)`` and in the builder, in this
    process. (For the command line, ``--resume`` and ``evaluate``, which start new
    processes, name the factory as ``PACKAGE.MODULE:FACTORY`` instead.) The factory
    takes keywords of :data:`KEYWORDS` ``["prior"]``.
    """
    return _register("prior", name, factory, replace)


def register_likelihood(
    name: str, factory: F | None = None, *, replace: bool = False
) -> Any:
    """Add ``factory`` to the likelihoods as ``name``; see :func:`register_prior`."""
    return _register("likelihood", name, factory, replace)


def register_guide(
    name: str, factory: F | None = None, *, replace: bool = False
) -> Any:
    """Add ``factory`` to the guides as ``name``; see :func:`register_prior`."""
    return _register("guide", name, factory, replace)
