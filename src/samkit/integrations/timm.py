"""samkit's SAM inside timm's own machinery: its optimizer factory and its AMP loss scaler.

**The factory.** ``timm.optim.create_optimizer_v2(model, opt=...)`` knows only the names in its
registry. :func:`register_with_timm` adds SAM over timm's optimizers to it::

    from samkit.integrations.timm import register_with_timm

    register_with_timm()  # "sam" (= "samsgd") and "samadamw"
    optimizer = timm.optim.create_optimizer_v2(model, opt="sam", lr=0.1, weight_decay=5e-4)

``"sam<base>"`` is SAM (or, with ``method=``, another method of samkit's optimizer registry) over
timm's ``<base>``, with that entry's defaults (timm's ``"sgd"`` is Nesterov SGD, momentum 0.9):
``rho`` and ``adaptive`` go to SAM, every other keyword to the base optimizer, and timm's weight
decay groups (no decay for biases and norm layers) become SAM's param groups. The names have no
underscore: timm reads only what follows the last ``_`` of a name, so ``"sam_adamw"`` builds
timm's plain AdamW and ``"lookahead_sam"`` wraps SAM in timm's Lookahead, whose ``step()``
cannot run SAM's two passes (:class:`SAMNativeScaler` refuses it). timm 1.0 exports the
``OptimizerRegistry`` class but not the instance behind ``create_optimizer_v2``; this module
registers into ``timm.optim._optim_factory.default_registry``. The recipe with timm's public API
only (nothing of this module)::

    base = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    optimizer = samkit.optim.SAM(base.param_groups, base, rho=0.05)

**The loss scaler.** timm's ``train.py`` makes a step with one call,
``loss_scaler(loss, optimizer, clip_grad=..., clip_mode=..., parameters=..., need_update=...)``
(``NativeScaler``: ``scale(loss).backward(); scaler.step(optimizer); scaler.update()``): one
pass, where SAM needs two. :class:`SAMNativeScaler` is a ``NativeScaler`` whose call also takes
``closure=``, the forward of the same batch (returning the loss, under the same autocast)::

    loss_scaler = SAMNativeScaler(device="cuda")  # enabled=False: float32 / bf16, no scaling
    loss = forward()
    loss_scaler(loss, optimizer, clip_grad=1.0, parameters=model.parameters(), closure=forward)

It runs SAM's first pass on ``loss`` (unscaled before the perturbation's norm), the second pass
at ``w + e`` with ``closure()``, clips the SAM gradient (after ``unscale_``, as timm does), and
``scaler.step(optimizer)`` makes the base step (``SAM.step()`` after ``first_step()``: an overflow
in either pass skips the step and backs the scale off once). For any other optimizer it is
timm's ``NativeScaler``. Refused with SAM: ``need_update=False`` (timm's ``--grad-accum-steps``:
SAM cannot be accumulated one call per micro-batch), ``create_graph=True``, ESAM (its data
selection needs per-sample losses) and Lookahead. The second forward updates BatchNorm running
statistics again and draws fresh dropout masks, as davda54/sam's loop does (for the official
policy, statistics from the first pass and the same masks, use samkit.train.SharpnessAwareStep).

This module imports timm; nothing else of samkit imports it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from timm.optim import OptimInfo as TimmOptimInfo
from timm.optim import OptimizerRegistry
from timm.utils import NativeScaler, dispatch_clip_grad
from torch import Tensor

from samkit.optim import ESAM, SAM, create_optimizer, get_optimizer_info, unwrap

__all__ = ["SAMNativeScaler", "register_with_timm"]


def _default_registry() -> OptimizerRegistry:
    """The registry behind ``timm.optim.create_optimizer_v2`` (a private attribute in timm 1.0)."""
    import timm
    from timm.optim import _optim_factory

    registry = getattr(_optim_factory, "default_registry", None)
    if not isinstance(registry, OptimizerRegistry):
        raise RuntimeError(
            f"timm {timm.__version__} has no timm.optim._optim_factory.default_registry to "
            "register SAM in; build the base optimizer with create_optimizer_v2 and wrap it: "
            "SAM(base.param_groups, base, rho=0.05)"
        )
    return registry


def _build(
    method: str, base: str, registry: OptimizerRegistry, params: Any, **kwargs: Any
) -> torch.optim.Optimizer:
    """What timm's factory calls as ``opt_class(params, **opt_args)``."""
    base_cls = registry.get_optimizer_class(base, bind_defaults=False)
    return create_optimizer(method, params, base_cls, **kwargs)


def register_with_timm(
    bases: Iterable[str] = ("sgd", "adamw"),
    *,
    method: str = "sam",
    registry: OptimizerRegistry | None = None,
) -> list[str]:
    """Register ``method + base`` (``"samsgd"``, ``"samadamw"``) in timm's optimizer factory for
    each ``base`` of timm's registry, and ``method`` itself (``"sam"``) for ``"samsgd"`` when
    ``"sgd"`` is among ``bases``; returns the names. ``method``: a sharpness-aware method of
    samkit's registry (``sam``, ``gsam``, ``wsam``, ``fsam``; ESAM is refused, see the module
    docstring). Calling it again is harmless; a name timm already uses for another optimizer is
    an error. ``registry``: timm's default one unless given."""
    info = get_optimizer_info(method)
    if not info.sharpness_aware or info.cls is None:
        raise ValueError(f"{method!r} is not a sharpness-aware method of samkit's registry")
    if issubclass(info.cls, ESAM):
        raise ValueError(
            "ESAM is not supported in timm's loop (its data selection needs "
            "per-sample losses); use sam, gsam, wsam or fsam"
        )
    registry = _default_registry() if registry is None else registry
    names = []
    for base in bases:
        base_info = registry.get_optimizer_info(base)  # ValueError for an unknown base
        if (
            isinstance(base_info.opt_class, functools.partial)
            and base_info.opt_class.func is _build
        ):
            raise ValueError(f"{base!r} is itself a samkit optimizer; name a timm optimizer")
        name = f"{method}{base_info.name}".lower()
        entry = TimmOptimInfo(
            name=name,
            opt_class=functools.partial(_build, method, base_info.name, registry),
            description=f"samkit {info.description}, over timm's {base_info.name}",
            has_eps=base_info.has_eps,
            has_momentum=base_info.has_momentum,
            has_betas=base_info.has_betas,
            num_betas=base_info.num_betas,
            defaults=base_info.defaults,
        )
        _register(registry, entry)
        names.append(name)
        if base_info.name == "sgd":
            _register(registry, dataclasses.replace(entry, name=method))
            names.append(method)
    return names


def _register(registry: OptimizerRegistry, entry: TimmOptimInfo) -> None:
    try:
        old = registry.get_optimizer_info(entry.name)
    except ValueError:
        old = None
    if old is not None:
        if isinstance(old.opt_class, functools.partial) and old.opt_class.func is _build:
            return  # registered before (the name says which method over which base)
        raise ValueError(f"timm already has an optimizer named {entry.name!r}")
    registry.register(entry)


class SAMNativeScaler(NativeScaler):
    """timm's ``NativeScaler`` with SAM's second pass: ``closure=`` (see the module docstring).

    ``enabled=False`` keeps the same calls without loss scaling (float32, bf16); other keywords
    go to ``torch.amp.GradScaler`` (``init_scale``, ``growth_interval``, ...)."""

    def __init__(
        self, device: str = "cuda", enabled: bool = True, **grad_scaler_kwargs: Any
    ) -> None:
        self._scaler = torch.amp.GradScaler(device=device, enabled=enabled, **grad_scaler_kwargs)

    def __call__(  # type: ignore[override]
        self,
        loss: Tensor,
        optimizer: torch.optim.Optimizer,
        clip_grad: float | None = None,
        clip_mode: str = "norm",
        parameters: Any = None,
        create_graph: bool = False,
        need_update: bool = True,
        *,
        closure: Callable[[], Tensor] | None = None,
    ) -> Tensor | None:
        """Both SAM passes and the step (SAM-family optimizers); returns the second pass's loss
        (None when the first pass overflowed). Any other optimizer: ``NativeScaler``'s call."""
        sam = _sam_of(optimizer)
        if sam is None:
            super().__call__(
                loss, optimizer, clip_grad, clip_mode, parameters, create_graph, need_update
            )
            return None
        if closure is None:
            raise TypeError(
                "SAMNativeScaler with a SAM optimizer needs closure=, a function that runs the "
                "forward of the same batch and returns the loss (SAM's second pass)"
            )
        if not need_update:
            raise ValueError(
                "SAMNativeScaler: need_update=False (gradient accumulation, timm's "
                "--grad-accum-steps) cannot be done one call per micro-batch with SAM: each "
                "micro-batch needs its own perturbation; use samkit.train.SharpnessAwareStep("
                "accumulation_steps=N), or no accumulation"
            )
        if create_graph:
            raise ValueError(
                "SAMNativeScaler: create_graph=True (second-order optimizers) is not "
                "supported with SAM"
            )
        if clip_grad is not None and parameters is None:
            raise ValueError("SAMNativeScaler: clip_grad needs parameters=, as NativeScaler's")
        scaler = self._scaler
        scaler.scale(loss).backward()
        # back_off=False: an overflow leaves its gradients for scaler.step to find (one back-off)
        ok = sam.first_step(scaler=scaler, back_off=False)
        for _ in range(sam.ascent_steps - 1):
            if not ok:
                break
            sam.zero_grad()
            scaler.scale(closure()).backward()
            ok = sam.ascent_step(scaler=scaler, back_off=False)
        second = None
        if ok:
            sam.zero_grad()
            second = closure()
            scaler.scale(second).backward()
        if clip_grad is not None:
            scaler.unscale_(sam)  # the SAM gradient, clipped as timm clips it
            dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
        scaler.step(sam)  # SAM.step() after first_step(): skips on an overflow, else second_step
        scaler.update()
        return None if second is None else second.detach()


def _sam_of(optimizer: Any) -> SAM | None:
    """The samkit SAM-family optimizer ``optimizer`` is (or wraps), None for any other; refuses
    what this scaler cannot run."""
    if isinstance(unwrap(getattr(optimizer, "_base_optimizer", None)), SAM):
        raise ValueError(
            "timm's Lookahead around SAM (opt='lookahead_sam...') is not supported: its step() "
            "cannot run SAM's two passes"
        )
    sam = unwrap(optimizer)
    if not isinstance(sam, SAM):
        return None
    if isinstance(sam, ESAM):
        raise ValueError(
            "SAMNativeScaler: ESAM is not supported (its data selection needs per-sample "
            "losses); use SAM, or samkit.train.SharpnessAwareStep for ESAM"
        )
    return sam
