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

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from samkit import domains
from samkit.domains import MAX_EPOCHS, SCALE, SEED, UNIT_CLOSED_OPEN, UNIT_OPEN_CLOSED, Interval
from samkit.optim._optim_info import OptimInfo, OptimOption
from samkit.optim.ascent_policy import AESAM, RST, RST_SCHEDULES, LateSAM
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


def _trajectory(lmbda: float, own: OptimOption) -> tuple[OptimOption, ...]:
    """SAF's or MESA's options: they change the loss, not the step (the base optimizer steps
    alone), so the options are the trajectory loss's (samkit.train.trajectory's keywords)."""
    loss = "lambda tau^2 KL(softmax(z / tau) || softmax(f(x) / tau))"
    return (
        OptimOption("lmbda", "trajectory_lambda", lmbda, f"SAF / MESA: weight lambda of {loss} "
                    "(default: 0.3 with --optimizer saf, 0.8 with mesa)", SCALE),
        OptimOption("tau", "trajectory_tau", 5.0, "SAF / MESA: the temperature tau",
                    Interval(0, SCALE.high, low_open=True)),
        OptimOption("start_epoch", "trajectory_start_epoch", 5, "SAF / MESA: the plain loss for "
                    "the first N epochs, the trajectory loss added from epoch N + 1 on (the "
                    "paper's E_start; 6 is the authors' code)", Interval(0, MAX_EPOCHS), kind=int),
        own,
    )  # fmt: skip


_SAF_EPOCHS_BACK = OptimOption("epochs_back", "saf_epochs_back", 3, "SAF: a sample's teacher z "
                               "is its logits from E epochs before", Interval(1, MAX_EPOCHS),
                               kind=int)  # fmt: skip
_MESA_DECAY = OptimOption("decay", "mesa_ema_decay", 0.9998, "MESA: decay of the teacher's moving "
                          "average of the weights, per step",
                          Interval(0, 1, low_open=True, high_open=True))  # fmt: skip


def _trajectory_label(name: str, own: str) -> Any:
    return lambda v: (
        f"{name} lambda={v['lmbda']:g} tau={v['tau']:g} {own.format(**v)} "
        f"from epoch {v['start_epoch'] + 1}"
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


def _adaptive(v: Mapping[str, Any]) -> str:
    return " adaptive" if v["adaptive"] else ""


def _looksam_label(v: Mapping[str, Any]) -> str:
    return f"LookSAM rho={v['rho']:g} k={v['k']} alpha={v['alpha']:g}" + _adaptive(v)


def _aesam_label(v: Mapping[str, Any]) -> str:
    c = f"{v['lambda2']:g}" + ("" if v["lambda1"] == v["lambda2"] else f"->{v['lambda1']:g}")
    return f"AE-SAM rho={v['rho']:g} delta={v['delta']:g} c={c}" + _adaptive(v)


def _rst_label(v: Mapping[str, Any]) -> str:
    p = f"{v['p']:g}"
    if v["schedule"] != "constant":
        p += f"->{v['p_end']:g} {v['schedule']}"
    return f"RST rho={v['rho']:g} p={p}" + _adaptive(v)


def _late_sam_label(v: Mapping[str, Any]) -> str:
    return f"LateSAM rho={v['rho']:g} start={v['start_fraction']:g}" + _adaptive(v)


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
#: AE-SAM's c_t: any sign, bounded as every number a command takes (samkit.domains).
_THRESHOLD = Interval(-domains.MAX_SCALE, domains.MAX_SCALE)

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
                help=(
                    "ESAM: rank samples by loss increase at w+e (sharpness) or by clean loss "
                    "(cheaper; not with noisy labels: it then selects the mislabelled samples)"
                ),
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
    # SAM on some steps only, or no extra pass (samkit.optim.ascent_policy, looksam, momentum_sam).
    # Schedules over training (AE-SAM's c_t, late-phase SAM's start, RST's p_t) take the run's
    # length, total_steps, from the trainer, which sets it on the optimizer's ascent_policy.
    OptimInfo(
        name="looksam",
        cls=LookSAM,
        description="LookSAM: SAM every k-th step; the steps between take one pass and add alpha "
        "times the last SAM step's gradient component orthogonal to the clean one (1 + 1/k passes)",
        paper="Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization, CVPR 2022",
        options=(
            _RHO,
            _ADAPTIVE,
            OptimOption(
                name="k",
                flag="looksam_k",
                default=5,
                help="LookSAM: SAM (and a new orthogonal component g_v) every k-th step, from the "
                "first; one pass on the steps between",
                domain=domains.COUNT,
                kind=int,
            ),
            OptimOption(
                name="alpha",
                flag="looksam_alpha",
                default=0.7,
                help="LookSAM: the steps between add alpha (||g|| / ||g_v||) g_v to the gradient",
                domain=SCALE,
            ),
        ),
        label=_looksam_label,
    ),
    OptimInfo(
        name="aesam",
        cls=AESAM,
        description="AE-SAM: SAM on the steps whose squared gradient norm is high for its moving "
        "mean and variance (threshold factor c_t from lambda2 to lambda1), the base optimizer "
        "alone on the others (about 1.3-1.5 passes)",
        paper="Jiang et al., An Adaptive Policy to Employ Sharpness-Aware Minimization, ICLR 2023",
        options=(
            _RHO,
            _ADAPTIVE,
            OptimOption(
                name="delta",
                flag="aesam_delta",
                default=0.9,
                help="AE-SAM: decay of the moving mean and variance of ||g||^2",
                domain=UNIT_CLOSED_OPEN,
            ),
            OptimOption(
                name="lambda1",
                flag="aesam_lambda1",
                default=-1.0,
                help="AE-SAM: c_t at the end of the run (linear from --aesam-lambda2 over the "
                "run's steps; a step is SAM when ||g||^2 >= mean + c_t std)",
                domain=_THRESHOLD,
            ),
            OptimOption(
                name="lambda2",
                flag="aesam_lambda2",
                default=1.0,
                help="AE-SAM: c_t at the first step",
                domain=_THRESHOLD,
            ),
        ),
        label=_aesam_label,
    ),
    OptimInfo(
        name="rst",
        cls=RST,
        description="RST / SS-SAM: each step is SAM with probability p_t, else one plain pass "
        "(1 + mean p_t passes)",
        paper="Zhao et al., Randomized Sharpness-Aware Training for Boosting Computational "
        "Efficiency in Deep Learning, 2022",
        options=(
            _RHO,
            _ADAPTIVE,
            OptimOption(
                name="p",
                flag="rst_p",
                default=0.5,
                help="RST: probability that a step is SAM (at the first step, with a schedule)",
                domain=domains.FRACTION,
            ),
            OptimOption(
                name="p_end",
                flag="rst_p_end",
                default=None,
                help="RST: the probability at the end of the run, for every --rst-schedule but "
                "constant",
                domain=domains.FRACTION,
                optional=True,
            ),
            OptimOption(
                name="schedule",
                flag="rst_schedule",
                default="constant",
                help="RST: p_t over the run's steps: constant (--rst-p), or from --rst-p to "
                "--rst-p-end piecewise (switch half way), linear or cosine",
                choices=RST_SCHEDULES,
                kind=str,
            ),
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
        name="late_sam",
        cls=LateSAM,
        description="late-phase SAM: the base optimizer alone (one pass) until a fraction of the "
        "run's steps, SAM from then on",
        paper="Zhou et al., Sharpness-Aware Minimization Efficiently Selects Flatter Minima Late "
        "in Training, 2024",
        options=(
            _RHO,
            _ADAPTIVE,
            OptimOption(
                name="start_fraction",
                flag="late_sam_start_fraction",
                default=0.875,
                help="late-phase SAM: SAM from step ceil(F x the run's steps) on, the base "
                "optimizer alone before",
                domain=domains.FRACTION,
            ),
        ),
        label=_late_sam_label,
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
    OptimInfo(
        name="saf",
        cls=None,
        description="SAF: the base optimizer on the loss plus lambda tau^2 KL(softmax(z / tau) || "
        "softmax(f(x) / tau)), z a sample's logits from E epochs before (one pass; stores them)",
        paper="Du et al., Sharpness-Aware Training for Free, NeurIPS 2022",
        options=_trajectory(0.3, _SAF_EPOCHS_BACK),
        sharpness_aware=False,
        label=_trajectory_label("SAF", "E={epochs_back}"),
    ),
    OptimInfo(
        name="mesa",
        cls=None,
        description="MESA: SAF with the teacher's logits from a moving average of the weights "
        "(one extra forward per step, no stored logits)",
        paper="Du et al., Sharpness-Aware Training for Free, NeurIPS 2022",
        options=_trajectory(0.8, _MESA_DECAY),
        sharpness_aware=False,
        label=_trajectory_label("MESA", "decay={decay:g}"),
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
    # saf, mesa: their options are samkit.train.trajectory's (the loss's), not the optimizer's
    kwargs = {k: v for k, v in kwargs.items() if k not in info.defaults()}
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
