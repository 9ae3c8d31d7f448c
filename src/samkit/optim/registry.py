"""The optimizer registry: which training methods exist, their options, and how to build them.

Each method (``"sgd"``, ``"sam"``, ``"esam"``) is described by an :class:`OptimInfo` (in the spirit
of timm's ``OptimInfo``): the optimizer class, one-line description and citation, and its options
(:class:`OptimOption`: constructor keyword, the ``samkit train`` setting that sets it, default,
help line, and the domain or choices of valid values). The command line, the training
configuration and the run labels are derived from these entries.

:func:`create_optimizer` builds a method around a base optimizer::

    opt = create_optimizer("esam", model.parameters(), torch.optim.SGD, beta=0.6, lr=0.1)

keywords naming one of the method's options are validated and go to the method; every other
keyword goes to the base optimizer (``lr``, ``momentum``, ...). ``params`` may be the model itself;
methods that choose which parameters to perturb (``"sam_on"``) need it, or the param groups their
helper builds (``samkit.optim.sam_on_groups(model)``).

Adding an optimizer: write its module in ``samkit/optim/`` (a ``SharpnessAwareOptimizer``
subclass, usually of ``SAM``), then add ONE entry to ``BUILTIN_OPTIMIZERS`` below (or call
:func:`register_optimizer` from your own code). The optimizer modules must not import this one.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from samkit.domains import SCALE, SEED, UNIT_CLOSED_OPEN, UNIT_OPEN_CLOSED, Interval
from samkit.optim.ascent_policy import RST
from samkit.optim.esam import ESAM, SDS_CRITERIA
from samkit.optim.friendly_sam import FriendlySAM
from samkit.optim.gsam import GSAM
from samkit.optim.looksam import LookSAM
from samkit.optim.momentum_sam import MomentumSAM
from samkit.optim.sam import SAM
from samkit.optim.sam_on import sam_on_groups
from samkit.optim.wsam import WSAM

__all__ = [
    "BUILTIN_OPTIMIZERS",
    "OptimInfo",
    "OptimOption",
    "create_optimizer",
    "get_optimizer_info",
    "list_optimizers",
    "register_optimizer",
]

_KINDS = (float, int, bool, str)


@dataclass(frozen=True)
class OptimOption:
    """One hyper-parameter of a training method.

    ``name`` is the optimizer's constructor keyword; ``flag`` the ``samkit train`` setting (a
    ``TrainConfig`` field, snake_case) that sets it; ``help`` its one-line command-line help.
    Numbers have a ``domain``, strings may have ``choices``; ``kind`` is the Python type of a value
    (float, int, bool or str).
    """

    name: str
    flag: str
    default: Any
    help: str
    domain: Interval | None = None
    choices: tuple[str, ...] | None = None
    kind: type = float

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"option {self.name!r}: kind must be one of {_KINDS}, got {self.kind}")
        if self.domain is not None and self.kind not in (float, int):
            raise ValueError(f"option {self.name!r}: a domain is for numbers, not {self.kind}")
        if self.choices is not None and self.kind is not str:
            raise ValueError(f"option {self.name!r}: choices are for strings, not {self.kind}")
        reason = self.check(self.default)
        if reason is not None:
            raise ValueError(f"option {self.name!r}: default {self.default!r} is not {reason}")

    def describe_values(self) -> str:
        """What a valid value is, e.g. ``"a number in (0, 1]"`` or ``"one of 'a', 'b'"``."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.domain is not None:
            return self.domain.describe(integer=self.kind is int)
        return {float: "a number", int: "an integer", bool: "True or False", str: "a string"}[
            self.kind
        ]

    def check(self, value: Any) -> str | None:
        """None when ``value`` is valid; otherwise what it should be (``describe_values()``)."""
        if self.kind is bool:
            valid = isinstance(value, bool)
        elif self.kind is str:
            valid = isinstance(value, str) and (self.choices is None or value in self.choices)
        else:
            number = numbers.Integral if self.kind is int else numbers.Real
            valid = isinstance(value, number) and not isinstance(value, bool)
            valid = valid and (self.domain is None or self.domain.contains(value))
        return None if valid else self.describe_values()


@dataclass(frozen=True)
class OptimInfo:
    """A training method: its optimizer class and options.

    ``cls`` is None for ``"sgd"``, the base optimizer alone. ``sharpness_aware`` says whether a
    step takes SAM's two passes; ``supports_sync_perturbations`` whether the step helper may
    all-reduce the first-pass gradients (ESAM may not: its weight masks leave parameters without
    first-pass gradients). ``label(values)`` formats the run label from the option values (all
    options present); use :meth:`describe`. ``param_groups(model)``, for a method that chooses
    which parameters to perturb, builds its param groups from the model (None: all of the
    model's parameters, one group).
    """

    name: str
    cls: type[Optimizer] | None
    description: str
    paper: str = ""
    options: tuple[OptimOption, ...] = ()
    sharpness_aware: bool = True
    supports_sync_perturbations: bool = True
    label: Callable[[Mapping[str, Any]], str] | None = field(default=None, compare=False)
    param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = field(
        default=None, compare=False
    )

    def __post_init__(self) -> None:
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"optimizer {self.name!r}: duplicate option names in {names}")

    def option(self, name: str) -> OptimOption:
        """The option called ``name``; ValueError naming the known options otherwise."""
        for opt in self.options:
            if opt.name == name:
                return opt
        known = ", ".join(o.name for o in self.options) or "none"
        raise ValueError(f"optimizer {self.name!r} has no option {name!r} (options: {known})")

    def defaults(self) -> dict[str, Any]:
        """Every option's default, by constructor keyword."""
        return {o.name: o.default for o in self.options}

    def validate(self, values: Mapping[str, Any]) -> None:
        """ValueError, naming this optimizer, the option and its domain, for an invalid value.

        Keys that are not options of this method are ignored (they are base-optimizer keywords).
        """
        for opt in self.options:
            if opt.name in values:
                reason = opt.check(values[opt.name])
                if reason is not None:
                    raise ValueError(
                        f"optimizer {self.name!r}: option {opt.name!r} must be {reason}, "
                        f"got {values[opt.name]!r}"
                    )

    def describe(self, kwargs: Mapping[str, Any] | None = None) -> str:
        """The run label for these option values (defaults for those missing; other keys are
        ignored), e.g. ``"SAM rho=0.05"``, ``"ASAM rho=0.1"``, ``"ESAM rho=0.05 beta=0.6
        gamma=0.5 adaptive"``."""
        values = {**self.defaults(), **(kwargs or {})}
        return self.label(values) if self.label is not None else self.name.upper()


# -- the built-in methods ------------------------------------------------------------------------


def _sam_label(v: Mapping[str, Any]) -> str:
    return f"{'ASAM' if v['adaptive'] else 'SAM'} rho={v['rho']:g}"


def _esam_label(v: Mapping[str, Any]) -> str:
    text = f"ESAM rho={v['rho']:g} beta={v['beta']:g} gamma={v['gamma']:g}"
    return text + (" adaptive" if v["adaptive"] else "")


def _sam_on_label(v: Mapping[str, Any]) -> str:
    return f"{'ASAM' if v['adaptive'] else 'SAM'}-ON rho={v['rho']:g}"


def _gsam_label(v: Mapping[str, Any]) -> str:
    return f"GSAM rho={v['rho']:g}->{v['rho_min']:g} alpha={v['alpha']:g}" + (
        " adaptive" if v["adaptive"] else ""
    )


def _wsam_label(v: Mapping[str, Any]) -> str:
    form = "decoupled" if v["decouple"] else "coupled"
    return f"WSAM rho={v['rho']:g} gamma={v['gamma']:g} {form}" + (
        " adaptive" if v["adaptive"] else ""
    )


def _fsam_label(v: Mapping[str, Any]) -> str:
    return f"F-SAM rho={v['rho']:g} sigma={v['sigma']:g} lambda={v['lmbda']:g}" + (
        " adaptive" if v["adaptive"] else ""
    )


def _looksam_label(v: Mapping[str, Any]) -> str:
    return f"LookSAM rho={v['rho']:g} k=5 alpha=0.7" + (" adaptive" if v["adaptive"] else "")


def _rst_label(v: Mapping[str, Any]) -> str:
    return f"RST rho={v['rho']:g} p=0.5" + (" adaptive" if v["adaptive"] else "")


_RHO = OptimOption(
    name="rho",
    flag="sam_rho",
    default=0.05,
    help="SAM neighbourhood size rho; 0 trains with plain SGD",
    domain=SCALE,
)
_ADAPTIVE = OptimOption(
    name="adaptive",
    flag="sam_adaptive",
    default=False,
    help="adaptive SAM (ASAM, Kwon et al. 2021)",
    kind=bool,
)

#: The built-in methods, in the order ``list_optimizers()`` gives them. One entry per method.
BUILTIN_OPTIMIZERS: tuple[OptimInfo, ...] = (
    OptimInfo(
        name="sgd",
        cls=None,
        description="the base optimizer alone (SGD with momentum): one forward/backward per step",
        sharpness_aware=False,
        label=lambda _: "SGD",
    ),
    OptimInfo(
        name="sam",
        cls=SAM,
        description="SAM: step with the gradient at the worst point of a rho-ball (two passes)",
        paper="Foret et al., Sharpness-Aware Minimization for Efficiently Improving "
        "Generalization, ICLR 2021",
        options=(_RHO, _ADAPTIVE),
        label=_sam_label,
    ),
    OptimInfo(
        name="esam",
        cls=ESAM,
        description="ESAM: SAM perturbing random parameter tensors (SWP) and re-running only the "
        "sharpest samples (SDS)",
        paper="Du et al., Efficient Sharpness-aware Minimization for Improved Training of Neural "
        "Networks, ICLR 2022",
        options=(
            _RHO,
            _ADAPTIVE,
            OptimOption(
                name="beta",
                flag="esam_beta",
                default=0.5,
                help="ESAM: probability that a parameter tensor joins the perturbation (SWP)",
                domain=UNIT_OPEN_CLOSED,
            ),
            OptimOption(
                name="gamma",
                flag="esam_gamma",
                default=0.5,
                help="ESAM: fraction of the batch kept for the second pass (SDS)",
                domain=UNIT_OPEN_CLOSED,
            ),
            OptimOption(
                name="sds_criterion",
                flag="esam_criterion",
                default="sharpness",
                help="ESAM: rank samples by loss increase at w+e (sharpness) or by loss",
                choices=SDS_CRITERIA,
                kind=str,
            ),
            OptimOption(  # the trainer passes its run seed
                name="seed",
                flag="run_seed",
                default=0,
                help="seed of ESAM's weight-mask generator",
                domain=SEED,
                kind=int,
            ),
        ),
        supports_sync_perturbations=False,
        label=_esam_label,
    ),
    OptimInfo(
        name="gsam",
        cls=GSAM,
        description="GSAM: SAM's update minus alpha times the clean gradient's part orthogonal "
        "to it; rho follows the learning rate (two passes)",
        paper="Zhuang et al., Surrogate Gap Minimization Improves Sharpness-Aware Training, "
        "ICLR 2022",
        options=(
            _RHO,
            _ADAPTIVE,
            OptimOption(
                name="alpha",
                flag="gsam_alpha",
                default=0.2,
                help="GSAM: weight of the ascent on the surrogate gap",
                domain=SCALE,
            ),
            OptimOption(
                name="rho_min",
                flag="gsam_rho_min",
                default=0.0,
                help="GSAM: rho when the learning rate reaches 0 (rho_t goes from --sam-rho at the "
                "peak learning rate to this, in proportion to the learning rate)",
                domain=SCALE,
            ),
        ),
        label=_gsam_label,
    ),
    OptimInfo(
        name="wsam",
        cls=WSAM,
        description="WSAM: the sharpness weighted by gamma / (1 - gamma) as a regulariser, "
        "decoupled from the base step (two passes)",
        paper="Yue et al., Sharpness-Aware Minimization Revisited: Weighted Sharpness as a "
        "Regularization Term, KDD 2023",
        options=(
            _RHO,
            _ADAPTIVE,
            OptimOption(
                name="gamma",
                flag="wsam_gamma",
                default=0.9,
                help="WSAM: the sharpness term's weight is gamma / (1 - gamma)",
                domain=UNIT_CLOSED_OPEN,
            ),
            OptimOption(
                name="decouple",
                flag="wsam_decouple",
                default=True,
                help="WSAM: apply the sharpness term outside the base optimizer (the paper's "
                "default); false: inside it",
                kind=bool,
            ),
        ),
        label=_wsam_label,
    ),
    OptimInfo(
        name="fsam",
        cls=FriendlySAM,
        description="Friendly-SAM: SAM perturbing along g minus sigma times a moving average "
        "of the gradients (two passes)",
        paper="Li et al., Friendly Sharpness-Aware Minimization, CVPR 2024",
        options=(
            _RHO,
            _ADAPTIVE,
            OptimOption(
                name="sigma",
                flag="fsam_sigma",
                default=1.0,
                help="Friendly-SAM: how much of the gradients' moving average is removed",
                domain=SCALE,
            ),
            OptimOption(
                name="lmbda",
                flag="fsam_lambda",
                default=0.95,
                help="Friendly-SAM: decay of the gradients' moving average",
                domain=UNIT_CLOSED_OPEN,
            ),
        ),
        label=_fsam_label,
    ),
    OptimInfo(
        name="sam_on",
        cls=SAM,
        description="SAM-ON: SAM perturbing only the normalisation layers' affine parameters "
        "(norm over them alone); every parameter is updated (two passes)",
        paper="Mueller et al., Normalization Layers Are All That Sharpness-Aware Minimization "
        "Needs, NeurIPS 2023",
        options=(_RHO, _ADAPTIVE),
        label=_sam_on_label,
        param_groups=sam_on_groups,
    ),
    # SAM on some steps only, or no extra pass (samkit.optim.ascent_policy, looksam, momentum_sam);
    # their other options (k, alpha, p and its schedule, ...) are the classes' keywords.
    OptimInfo(
        name="looksam",
        cls=LookSAM,
        description="LookSAM: SAM every 5th step; the steps between take one pass and add 0.7 "
        "times the last SAM step's gradient component orthogonal to the clean one (1.2 passes)",
        paper="Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization, CVPR 2022",
        options=(_RHO, _ADAPTIVE),
        label=_looksam_label,
    ),
    OptimInfo(
        name="rst",
        cls=RST,
        description="RST / SS-SAM: each step is SAM with probability 0.5, else one plain pass "
        "(1.5 passes on average)",
        paper="Zhao et al., Randomized Sharpness-Aware Training for Boosting Computational "
        "Efficiency in Deep Learning, 2022",
        options=(
            _RHO,
            _ADAPTIVE,
            OptimOption(  # the trainer passes its run seed: the same draws on every replica
                name="seed",
                flag="run_seed",
                default=0,
                help="seed of RST's draws",
                domain=SEED,
                kind=int,
            ),
        ),
        label=_rst_label,
    ),
    OptimInfo(
        name="msam",
        cls=MomentumSAM,
        description="Momentum-SAM: perturb along minus the base optimizer's momentum before "
        "the step's only pass (one pass)",
        paper="Becker et al., Momentum-SAM: Sharpness Aware Minimization without Computational "
        "Overhead, 2024",
        options=(_RHO,),
        label=lambda v: f"MSAM rho={v['rho']:g}",
    ),
)

_REGISTRY: dict[str, OptimInfo] = {}


def register_optimizer(info: OptimInfo) -> OptimInfo:
    """Add a method to the registry (ValueError if its name is taken); returns ``info``."""
    if info.name in _REGISTRY:
        raise ValueError(f"an optimizer named {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def get_optimizer_info(name: str) -> OptimInfo:
    """The registered method ``name``; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(_REGISTRY)
        raise ValueError(f"unknown optimizer {name!r}; known optimizers: {known}") from None


def list_optimizers() -> list[str]:
    """The registered method names, in registration order."""
    return list(_REGISTRY)


def create_optimizer(
    name: str,
    params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
    base_optimizer: type[Optimizer] | Optimizer,
    **kwargs: Any,
) -> Optimizer:
    """Build method ``name`` over ``params`` (a model, its parameters or param groups) around
    ``base_optimizer``. A model gives its param groups for the method (``info.param_groups``,
    SAM-ON's), else all of its parameters in one group.

    Keywords that are options of the method (``get_optimizer_info(name).options``) are validated
    (ValueError naming the optimizer, the option and its domain) and passed to the method;
    all others go to the base optimizer. ``"sgd"`` returns ``base_optimizer(params, **kwargs)``
    (or the ``base_optimizer`` instance itself, which then takes no keywords); the others
    ``info.cls(params, base_optimizer, **kwargs)``.
    """
    info = get_optimizer_info(name)
    info.validate(kwargs)
    if isinstance(params, nn.Module):
        params = info.param_groups(params) if info.param_groups else list(params.parameters())
    elif info.param_groups is not None:
        params = list(params)
        if not all(isinstance(g, dict) for g in params):
            raise ValueError(
                f"optimizer {name!r} chooses which parameters to perturb from the model: pass "
                f"the model itself (create_optimizer({name!r}, model, ...)) or the param groups "
                f"it builds ({info.param_groups.__module__}.{info.param_groups.__name__}(model))"
            )
    if info.cls is not None:
        return info.cls(params, base_optimizer, **kwargs)
    if isinstance(base_optimizer, Optimizer):
        if kwargs:
            raise TypeError(
                f"keyword arguments {sorted(kwargs)} are for building the base optimizer; pass an "
                "optimizer class, or drop them when passing an optimizer instance"
            )
        return base_optimizer
    return base_optimizer(params, **kwargs)


for _info in BUILTIN_OPTIMIZERS:
    register_optimizer(_info)
del _info
