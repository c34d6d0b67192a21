"""FitConfig: every knob of a training run, its default and what it means.

Each field is one command-line flag (``latent_dim`` -> ``--latent-dim``); the help text
lives in the field's metadata, so the parser in :mod:`pyro_vae.cli.fit` is generated
from this one table.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pyro_vae.errors import ConfigError
from pyro_vae.losses.select import GRAD_ESTIMATORS, make_kernel
from pyro_vae.memory import format_bytes, machine_memory

__all__ = [
    "EVAL_METHODS",
    "RESUMABLE",
    "MAX_EPOCHS",
    "MAX_SEED",
    "FitConfig",
    "resolve_device",
]

#: settings a resumed run may change (``--resume RUN_DIR`` with these flags)
RESUMABLE = (
    "epochs",
    "lr",
    "device",
    "quiet",
    "checkpoint_every",
    "grad_clip",
    "jit",
    "eval_k",
    "eval_method",
    "eval_ais_steps",
    "eval_chains",
    "eval_leapfrog",
    "devices",
    "num_nodes",
)
#: ``--eval-method``: as ``python -m pyro_vae.evaluate --method``
EVAL_METHODS = ("is", "ais", "both")
MAX_SEED = 2**32 - 1  # numpy's legacy seeding, which pyro.set_rng_seed uses
MAX_EPOCHS = 10**9
_MAX_INT = 2**63 - 1  # what torch holds in an int64
_CHECK_MEMORY = contextvars.ContextVar("check_memory", default=True)


def _f(default: Any, help: str, **meta: Any) -> Any:  # noqa: A002 - argparse's word
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class FitConfig:
    """A resolved training run; ``config.json`` in a run directory is this, as JSON."""

    # data
    dataset: str = _f("digits", "dataset name")
    data_dir: str = _f(
        "data", "folder for torchvision datasets (download or IDX files)"
    )
    data_path: str | None = _f(None, ".npz file with x_train, x_test for --dataset npz")
    download: bool = _f(True, "never download: use only local IDX files")
    valid_fraction: float = _f(
        0.1, "share of the training data held out for validation"
    )
    binarize: str = _f(
        "auto",
        "dynamic: fresh Bernoulli draw per batch; static: one fixed draw; none; "
        "auto: dynamic for the Bernoulli likelihood, none otherwise",
    )
    # model p(z) p(x|z) and guide q(z|x)
    prior: str = _f("normal", "prior p(z)")
    likelihood: str = _f("bernoulli", "likelihood p(x|z)")
    sigma: float = _f(1.0, "Gaussian noise sd (fixed), or its initial value (learned)")
    sigma_floor: float = _f(
        1e-3, "floor of every learned or predicted scale of a likelihood"
    )
    guide: str = _f("diagonal", "guide q(z|x)")
    arch: str = _f("mlp", "networks: mlp, or conv (images: sized from H x W x C)")
    components: int = _f(10, "mixture components of the mog prior")
    pseudo_inputs: int = _f(500, "pseudo-inputs of the vamp prior")
    df: float = _f(3.0, "degrees of freedom of the student-t prior")
    rank: int = _f(2, "rank of the lowrank guide's covariance factor")
    flow_steps: int = _f(2, "autoregressive (IAF) steps of the flow guide")
    latent_dim: int = _f(10, "size of z")
    hidden: tuple[int, ...] = _f((400,), "hidden widths of encoder and decoder MLPs")
    activation: str = _f("relu", "activation of the MLPs")
    # optimization
    epochs: int = _f(50, "passes over the training data")
    batch_size: int = _f(100, "data per step (AEVB's M = 100)")
    lr: float = _f(1e-3, "Adam learning rate")
    elbo: str = _f("trace", "trace: Trace_ELBO; meanfield: TraceMeanField_ELBO")
    num_particles: int = _f(1, "z samples per datum per step, vectorized")
    loss: str = _f(
        "elbo",
        "objective: elbo (see --elbo), iwae (the IWAE bound with --num-particles K "
        "per datum), or the InfoVAE family: infovae (--alpha, --lam), mmd-vae "
        "(alpha=1, --lam), beta-vae (--beta), ae (no KL, no MMD)",
    )
    grad_estimator: str = _f(
        "reparam",
        "gradient estimator: reparam (the reparameterized gradient of the loss), "
        "dreg (doubly reparameterized guide gradients; --loss iwae) or stl "
        "(sticking the landing; --loss elbo)",
    )
    alpha: float = _f(0.0, "InfoVAE alpha: 1 - alpha weighs KL(q(z|x) || p(z))")
    lam: float = _f(1000.0, "InfoVAE lambda: alpha + lambda - 1 weighs MMD(q(z), p(z))")
    beta: float = _f(4.0, "beta of beta-vae: the weight of the KL term")
    kl_warmup: float = _f(
        0.0,
        "epochs over which the KL term's weight rises linearly from 0 to 1 "
        "(Sonderby et al. 2016); 0 is off. Reported ELBOs keep weight 1",
    )
    kernel: str = _f(
        "rbf", "MMD kernel: rbf or imq; add -multi for scales 0.1..10 (rbf-multi)"
    )
    bandwidth: str = _f(
        "dim",
        "MMD kernel scale: dim (2 d sigma^2, sigma = 1), median (median heuristic) "
        "or a number sigma (fixed, 2 sigma^2)",
    )
    # evaluation
    eval_k: int = _f(
        1000,
        "importance samples per datum for the final test log p(x); 0 skips the "
        "final evaluation, whatever --eval-method",
    )
    eval_method: str = _f(
        "is",
        "the final test log p(x) by is (importance sampling, --eval-k), ais "
        "(annealed importance sampling, --eval-ais-steps) or both, compared per datum",
    )
    eval_ais_steps: int = _f(
        1000, "AIS steps (>= 2) of the final evaluation (ais, both)"
    )
    eval_chains: int = _f(16, "AIS chains per datum of the final evaluation")
    eval_leapfrog: int = _f(10, "leapfrog steps per AIS transition, final evaluation")
    # run
    checkpoint_every: int = _f(1, "write checkpoint.pt every N epochs (and at the end)")
    grad_clip: float = _f(0.0, "clip the global gradient norm to this; 0 is off")
    jit: bool = _f(
        True,
        "run Pyro eagerly every step instead of replaying the loss traced once per "
        "batch shape (same draws and gradients; needed if the model branches on data "
        "values)",
    )
    device: str = _f("auto", "auto (CUDA when available), cpu, cuda or cuda:I")
    devices: int = _f(
        1,
        "processes per node training one model data-parallel (torchrun + DDP; each "
        "takes cuda:LOCAL_RANK on CUDA); --batch-size stays the global batch",
    )
    num_nodes: int = _f(
        1,
        "nodes of a multi-node run; each node needs MASTER_ADDR, MASTER_PORT (of "
        "node 0) and NODE_RANK in its environment",
    )
    seed: int = _f(0, "seeds torch, numpy and python")
    out: str | None = _f(None, "run directory; default runs/<dataset>-<timestamp>")
    quiet: bool = _f(False, "no progress bar and no summary table")

    def __post_init__(self) -> None:
        """Check every setting; raise :class:`ConfigError` naming the first bad one."""
        _check_types(self)
        checks = (
            *_limit_checks(self),
            *_range_checks(self),
            *_combination_checks(self),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        try:
            make_kernel(self.kernel, self.bandwidth)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        # prior, likelihood, guide: a registry name or PACKAGE.MODULE:FACTORY (not
        # imported here; the builder imports it). Imported late: parts imports the
        # registries of models and guides.
        from pyro_vae.cli.parts import check_names

        check_names(self)
        if _CHECK_MEMORY.get():
            _check_memory(self)

    def resolved_binarize(self) -> str:
        """What ``binarize="auto"`` means for this likelihood."""
        if self.binarize != "auto":
            return self.binarize
        return "dynamic" if self.likelihood == "bernoulli" else "none"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(
        cls, values: dict[str, Any], source: str = "the stored config"
    ) -> FitConfig:
        """Rebuild a config saved by :meth:`to_json` (lists become tuples).

        ``source`` names where ``values`` came from in error messages, e.g.
        ``"the config stored in runs/a/checkpoint.pt"``.
        """
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"{source} is a {type(values).__name__}, not a mapping of settings"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(
                f"unknown config keys {sorted(unknown)} in {source}; this version of "
                "pyro_vae does not know them (written by another version, or edited)"
            )
        values = dict(values)
        if isinstance(values.get("hidden"), list):
            values["hidden"] = tuple(values["hidden"])
        # a stored config passed the memory check where it was written; what it
        # needs to be loaded here (weights only) is checked by pyro_vae.cli.loading
        token = _CHECK_MEMORY.set(False)
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        finally:
            _CHECK_MEMORY.reset(token)


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:I`` into a device that exists.

    ``flag`` names the setting in messages: ``--device`` on the command line,
    ``device=`` for a keyword argument of the Python API.
    """
    given = f"{flag}{name}" if flag.endswith("=") else f"{flag} {name}"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"unknown device {name!r}; use auto, cpu, cuda or cuda:I"
        ) from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu or cuda")
    if not torch.cuda.is_available():
        cpu = f"{flag}cpu" if flag.endswith("=") else f"{flag} cpu"
        raise ConfigError(
            f"{given} asks for CUDA, but torch sees no CUDA GPU here; use "
            f"{cpu} (or auto, which picks CUDA only when it is there)"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"{given}: there are only {torch.cuda.device_count()} CUDA devices"
        )
    return device


def _limit_checks(cfg: FitConfig) -> list[tuple[bool, str]]:
    """(ok, message) for the seed, the epochs, integer sizes and empty paths."""
    return [
        (
            0 <= cfg.seed <= MAX_SEED,
            f"--seed must be an integer from 0 to 2**32 - 1 = {MAX_SEED} "
            f"(numpy's seed range), got {cfg.seed}",
        ),
        (
            cfg.epochs <= MAX_EPOCHS,
            f"--epochs must be at most {MAX_EPOCHS:,}, got {cfg.epochs:,}",
        ),
        *(
            (
                getattr(cfg, f.name) <= _MAX_INT,
                f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)} is too "
                f"large; it must be at most 2**63 - 1",
            )
            for f in dataclasses.fields(cfg)
            if isinstance(f.default, int)
            and not isinstance(f.default, bool)
            and f.name not in ("seed", "epochs")
        ),
        *(
            (
                value is None or value.strip() != "",
                f"--{name.replace('_', '-')} is an empty string; give a path, or "
                "leave the flag out",
            )
            for name, value in (
                ("data_dir", cfg.data_dir),
                ("data_path", cfg.data_path),
                ("out", cfg.out),
            )
        ),
    ]


def _range_checks(cfg: FitConfig) -> list[tuple[bool, str]]:
    """(ok, message) for each number that must lie in a range."""
    return [
        (cfg.latent_dim >= 1, f"--latent-dim must be >= 1, got {cfg.latent_dim}"),
        (cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}"),
        (
            cfg.eval_k == 0 or cfg.eval_k >= 2,
            f"--eval-k must be 0 (skip) or >= 2, got {cfg.eval_k}",
        ),
        (
            cfg.eval_method in EVAL_METHODS,
            f"--eval-method must be one of {', '.join(EVAL_METHODS)}, got "
            f"{cfg.eval_method!r}",
        ),
        (
            cfg.eval_ais_steps >= 2,
            f"--eval-ais-steps must be >= 2 (one step has no transition), got "
            f"{cfg.eval_ais_steps}",
        ),
        (
            cfg.eval_chains >= 2,
            f"--eval-chains must be >= 2 (one chain gives no se), got "
            f"{cfg.eval_chains}",
        ),
        (
            cfg.eval_leapfrog >= 1,
            f"--eval-leapfrog must be >= 1, got {cfg.eval_leapfrog}",
        ),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (
            cfg.lr > 0 and math.isfinite(cfg.lr),
            f"--lr must be a positive finite number, got {cfg.lr}",
        ),
        (
            cfg.num_particles >= 1,
            f"--num-particles must be >= 1, got {cfg.num_particles}",
        ),
        (
            0 < cfg.valid_fraction < 1,
            f"--valid-fraction must lie in (0, 1), got {cfg.valid_fraction}",
        ),
        (
            all(w >= 1 for w in cfg.hidden),
            f"--hidden widths must be positive, got {cfg.hidden}",
        ),
        (
            1e-6 <= cfg.sigma < math.inf,
            f"--sigma must be at least 1e-6 and finite, got {cfg.sigma}",
        ),
        (
            cfg.elbo in ("trace", "meanfield"),
            f"--elbo must be trace or meanfield, got {cfg.elbo!r}",
        ),
        (
            cfg.grad_estimator in GRAD_ESTIMATORS,
            f"--grad-estimator must be one of {', '.join(GRAD_ESTIMATORS)}, got "
            f"{cfg.grad_estimator!r}",
        ),
        (
            min(cfg.components, cfg.pseudo_inputs, cfg.rank) >= 1,
            "--components, --pseudo-inputs and --rank must be >= 1, got "
            f"{cfg.components}, {cfg.pseudo_inputs}, {cfg.rank}",
        ),
        (cfg.flow_steps >= 0, f"--flow-steps must be >= 0, got {cfg.flow_steps}"),
        (
            0 < cfg.df < math.inf,
            f"--df must be positive and finite, got {cfg.df}",
        ),
        (
            cfg.checkpoint_every >= 1,
            f"--checkpoint-every must be >= 1, got {cfg.checkpoint_every}",
        ),
        (
            0 <= cfg.grad_clip < math.inf,
            f"--grad-clip must be >= 0 (0 is off), got {cfg.grad_clip}",
        ),
        (
            cfg.beta >= 0 and math.isfinite(cfg.beta),
            f"--beta must be >= 0, got {cfg.beta}",
        ),
        (
            math.isfinite(cfg.alpha) and math.isfinite(cfg.lam),
            f"--alpha and --lam must be finite, got {cfg.alpha}, {cfg.lam}",
        ),
        (
            0 <= cfg.kl_warmup < math.inf,
            f"--kl-warmup must be a number of epochs >= 0, got {cfg.kl_warmup}",
        ),
    ]


def _combination_checks(cfg: FitConfig) -> list[tuple[bool, str]]:
    """(ok, message) for flags that must agree: warm-up, loss, processes."""
    return [
        *_estimator_checks(cfg),
        (
            not cfg.kl_warmup or cfg.loss != "iwae",
            "--kl-warmup weighs a KL term, and the IWAE bound (--loss iwae) has "
            "none; drop --kl-warmup or use --loss elbo",
        ),
        (
            not cfg.kl_warmup or cfg.loss not in ("mmd-vae", "ae"),
            f"--kl-warmup weighs the KL term, and --loss {cfg.loss} has none "
            "(alpha = 1); drop --kl-warmup or use elbo, beta-vae or infovae",
        ),
        (
            not cfg.kl_warmup or cfg.elbo == "trace",
            "--kl-warmup weighs the Monte Carlo KL of Trace_ELBO; use --elbo "
            "trace with it",
        ),
        (cfg.devices >= 1, f"--devices must be >= 1, got {cfg.devices}"),
        (cfg.num_nodes >= 1, f"--num-nodes must be >= 1, got {cfg.num_nodes}"),
        (
            cfg.batch_size % max(1, cfg.devices * cfg.num_nodes) == 0,
            f"--batch-size {cfg.batch_size} is the global batch and must divide "
            f"by the {cfg.devices * cfg.num_nodes} processes (--devices x "
            "--num-nodes)",
        ),
        (
            cfg.devices * cfg.num_nodes == 1 or ":" not in cfg.device,
            f"--device {cfg.device} names one GPU; with several processes use "
            "--device cuda (each process takes cuda:LOCAL_RANK) or auto",
        ),
    ]


def _estimator_checks(cfg: FitConfig) -> list[tuple[bool, str]]:
    """(ok, message) for --grad-estimator against the loss it differentiates."""
    return [
        (
            cfg.grad_estimator != "dreg" or cfg.loss == "iwae",
            f"--grad-estimator dreg is the doubly reparameterized gradient of the "
            f"IWAE bound, not of --loss {cfg.loss}; use it with --loss iwae (for "
            "--loss elbo use stl)",
        ),
        (
            cfg.grad_estimator != "stl" or cfg.loss == "elbo",
            f"--grad-estimator stl is a gradient of the ELBO, not of --loss "
            f"{cfg.loss}; use it with --loss elbo (for --loss iwae use dreg)",
        ),
        (
            cfg.grad_estimator != "stl" or cfg.elbo == "trace",
            "--grad-estimator stl replaces the Monte Carlo log q(z|x) of Trace_ELBO, "
            "which --elbo meanfield computes in closed form; use --elbo trace",
        ),
        (
            cfg.grad_estimator != "stl" or not cfg.kl_warmup,
            "--grad-estimator stl and --kl-warmup cannot be combined (the warm-up's "
            "weighted ELBO has no STL estimator here); drop one of them",
        ),
    ]


def _check_types(cfg: FitConfig) -> None:
    """Each field holds its default's type (a config from JSON or Python may not)."""
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(f.default, tuple):
            ok = isinstance(value, tuple | list) and all(map(_is_integer, value))
            if ok:  # lists (JSON, Python) and numpy integers become a tuple of ints
                object.__setattr__(cfg, f.name, tuple(int(w) for w in value))
            kind = "a tuple of integers"
        elif isinstance(f.default, bool):
            ok, kind = isinstance(value, bool), "True or False"
        elif isinstance(f.default, int):
            ok, kind = _is_integer(value), "an integer"
            if ok:
                object.__setattr__(cfg, f.name, int(value))
        elif isinstance(f.default, float):
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            kind = "a number"
            if ok:  # numpy scalars become plain floats (config.json holds them)
                object.__setattr__(cfg, f.name, float(value))
        else:  # str, or str | None
            ok = isinstance(value, str) or (f.default is None and value is None)
            kind = "a string" if f.default is not None else "a string or None"
        if not ok:
            raise ConfigError(f"{flag} must be {kind}, got {value!r}")


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# ------------------------------------------------------------------------- memory

#: (D, training data, test data) of the built-in datasets, so that the memory a
#: config needs can be estimated before any data are loaded; npz data are unknown
#: and counted as one feature and one datum, which makes the estimate a lower bound
_KNOWN_DATA = {
    "digits": (64, 1293, 360),
    "mnist": (784, 54000, 10000),
    "fashion-mnist": (784, 54000, 10000),
    "kmnist": (784, 54000, 10000),
}
#: flags whose size the estimate depends on, in the order they are blamed
_MEMORY_FLAGS = (
    "hidden",
    "latent_dim",
    "num_particles",
    "eval_k",
    "components",
    "pseudo_inputs",
    "rank",
    "flow_steps",
    "batch_size",
)


def _mlp_params(widths: list[int]) -> int:
    return sum(a * b + b for a, b in zip(widths, widths[1:], strict=False))


def network_params(values: Mapping[str, Any], data_dim: int) -> int:
    """About how many parameters the networks of a config have (registry parts;
    parts of one's own are counted as the diagonal guide and a fixed prior)."""
    d, hidden = values["latent_dim"], list(values["hidden"])
    guide, steps = values["guide"], values["flow_steps"]
    out = {
        "lowrank": d * (values["rank"] + 2),
        "fullrank": d + d * (d + 1) // 2,
        "flow": 2 * d + (2 * d if steps else 0),
    }.get(guide, 2 * d)
    if values["arch"] == "mlp":
        nets = _mlp_params([data_dim, *hidden, out])
        nets += _mlp_params([d, *hidden[::-1], data_dim])
    else:  # conv: a 256-wide dense layer on each side
        nets = 256 * (out + d)
    if guide == "flow":  # each step: an autoregressive net (d + 2d) -> 10d -> 2d
        nets += steps * 50 * d * d
    nets += {
        "mog": values["components"] * (2 * d + 1),
        "vamp": values["pseudo_inputs"] * data_dim,
    }.get(values["prior"], 0)
    return nets


def _memory_terms(values: Mapping[str, Any]) -> dict[str, int]:
    """Bytes of the largest allocations of a run, by what they hold (lower bounds)."""
    data_dim, n_train, n_test = _KNOWN_DATA.get(values["dataset"], (1, 1, 1))
    d, hidden = values["latent_dim"], list(values["hidden"])
    width = 2 * sum(hidden) + 4 * d + 2 * data_dim  # activations per row, both nets
    processes = max(1, values["devices"] * values["num_nodes"])
    batch = max(1, min(values["batch_size"], n_train) // processes)
    rows = values["num_particles"] * batch
    if values["prior"] == "vamp":
        rows += values["pseudo_inputs"]
    weights = 4 * network_params(values, data_dim)
    chunk = min(100, n_test)  # pyro_vae.evaluate.marginal's data chunk
    evaluation = 8 * values["eval_k"] * chunk + 4 * 16 * chunk * width
    return {
        # float32 weights, their gradients and Adam's two moments
        _NETWORKS: 4 * weights,
        # forward values kept for the backward pass, and their gradients
        _TRAINING: 2 * 4 * rows * width,
        # K float64 log-weights per datum of a data chunk, and 16 particles' passes
        _EVALUATION: evaluation if values["eval_k"] else 0,
    }


_NETWORKS = "the networks' weights, gradients and Adam moments"
_TRAINING = "the activations of one training step"
_EVALUATION = "the final evaluation's --eval-k log-weights and activations"


def _memory_needed(values: Mapping[str, Any]) -> int:
    terms = _memory_terms(values)
    return terms[_NETWORKS] + max(terms[_TRAINING], terms[_EVALUATION])


def _check_memory(cfg: FitConfig) -> None:
    """Refuse a config whose networks and buffers cannot fit in this machine."""
    values = dataclasses.asdict(cfg)
    values["hidden"] = cfg.hidden
    need = _memory_needed(values)
    limit = machine_memory(need, cfg.device)
    if need <= limit:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(FitConfig)}
    saved = {}
    for name in _MEMORY_FLAGS:
        smaller = dict(values)
        if name == "hidden":
            smaller["hidden"] = tuple(min(w, 400) for w in cfg.hidden)
        else:
            smaller[name] = min(values[name], defaults[name])
        saved[name] = need - _memory_needed(smaller)
    flag = max(_MEMORY_FLAGS, key=lambda name: saved[name])
    terms = _memory_terms(values)
    what = max(terms, key=terms.get)
    value = ",".join(map(str, cfg.hidden)) if flag == "hidden" else values[flag]
    raise ConfigError(
        f"this run needs about {format_bytes(need)} of memory (most of it for "
        f"{what}), more than the {format_bytes(limit)} this machine has; lower "
        f"--{flag.replace('_', '-')} (now {value})"
    )
