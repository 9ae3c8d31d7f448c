"""How frameworks call a sharpness-aware optimizer, apart from the update itself.

* ``step()`` after ``first_step()`` finishes the step (GradScaler, Accelerate, the HF Trainer and
  Lightning call an optimizer so), and under ``GradScaler.step`` the optimizer unscales, or skips
  an overflow, itself (torch's ``_step_supports_amp_scaling`` protocol), so that ``w`` is always
  restored from ``w + e``.
* ``step(closure)`` refuses gradients accumulated before it (a framework's micro-batches, a first
  pass of the user's own): they would leak into the update; and the framework calls it cannot
  serve: ``GradScaler.step(opt, closure)``, Accelerate's accumulation (closures never run).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import torch

from samkit.optim import _functional as F
from samkit.optim import numerics
from samkit.optim._flat import StepPlan

FOREIGN_GRADIENTS = (
    "{name}.step(closure): the parameters already hold gradients that this optimizer's last step "
    "did not leave: a first pass run before step(), or micro-batches accumulated by a framework "
    "(Lightning accumulate_grad_batches, Hugging Face gradient_accumulation_steps, Accelerate's "
    "accumulate()). step(closure) runs both passes from zeroed gradients, so these would leak "
    "into the update. Zero the gradients first (opt.zero_grad()); for a first pass of your own "
    "call opt.first_step() and opt.second_step() around the second; to accumulate micro-batches "
    "use samkit.train.SharpnessAwareStep(accumulation_steps=N) or a samkit.integrations module"
)


def two_pass_step(opt: Any, closure: Callable[[], Any] | None, scaler: Any) -> Any:
    """``SAM.step``: the closure form of a step with an ascent (see its docstring)."""
    if opt._awaiting_second_step or closure is None:
        return finish_step(opt, closure)
    refuse_foreign_gradients(opt)
    closure = torch.enable_grad()(closure)
    loss = closure()
    if not opt.wants_ascent(scaler=scaler):  # an ascent policy's no: one pass
        opt.skip_ascent()
    # an overflow leaves its non-finite gradients for scaler.step to find: one back-off
    elif opt.first_step(scaler=scaler, back_off=False):
        try:
            for _ in range(opt.ascent_steps - 1):
                closure()
                if not opt.ascent_step(scaler=scaler, back_off=False):
                    break
            if opt._failed_pass is None:
                closure()
        except BaseException:  # e.g. out of memory: never leave the model at w + e
            opt.unperturb()
            opt._awaiting_second_step = False
            raise
    if scaler is not None and scaler.is_enabled():
        scaler.step(opt)  # unscales, finds overflows, then calls step() (below)
    else:
        opt.second_step()
    mark_gradients(opt)
    return loss


def finish_step(opt: Any, closure: Callable[[], Any] | None) -> Any:
    """``step()`` after ``first_step()``: ``closure`` (if any) as the second pass, then
    ``second_step()``. Under ``GradScaler.step`` (see ``_step_supports_amp_scaling``) the
    gradients are unscaled here, and an overflow it found skips the step."""
    # set by GradScaler.step for this call only (it deletes them afterwards)
    grad_scale, found_inf = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
    if not opt._awaiting_second_step:
        if grad_scale is not None or found_inf is not None:
            raise RuntimeError(
                f"{type(opt).__name__}.step() was called by a GradScaler with no first_step() "
                "before it: with fp16, call first_step(scaler=scaler) after the first "
                "backward, or step(closure, scaler=scaler) (a framework that runs one "
                "backward and then scaler.step(optimizer), as Lightning's precision='16-mixed' "
                "with automatic optimisation, cannot run SAM's second pass: use bf16, or see "
                "docs/integrations.md)"
            )
        raise RuntimeError(
            f"{type(opt).__name__}.step() needs a closure that zeroes the gradients, runs the "
            "forward and backward pass and returns the loss, e.g. opt.step(closure); or call "
            "opt.first_step() and opt.second_step() around your own two passes (in the Hugging "
            "Face Trainer: samkit.integrations.transformers.SAMTrainer; with Accelerate: "
            "samkit.integrations.accelerate.sam_backward; see docs/integrations.md)"
        )
    loss = torch.enable_grad()(closure)() if closure is not None else None
    if found_inf is not None and found_inf.item() > 0:
        opt.fail_step("second")
    elif grad_scale is not None:
        unscale(opt, opt._plan(), 1.0 / float(grad_scale))
    opt.second_step()
    return loss


@torch.no_grad()
def unscale(opt: Any, plan: StepPlan | None, inverse_scale: float) -> None:
    """Multiply the current gradients of ``plan`` by ``inverse_scale`` (1 / loss scale)."""
    if plan is not None and plan.params and inverse_scale != 1.0:
        F.scale_(plan.grads(), inverse_scale, foreach=opt._plan_foreach(plan))


def mark_gradients(opt: Any) -> None:
    """Remember the gradients this step leaves behind (see ``refuse_foreign_gradients``)."""
    opt._grad_marks = {
        id(p): (p.grad, p.grad._version)
        for g in opt.param_groups
        for p in g["params"]
        if p.grad is not None
    }


def refuse_framework_closure(opt: Any) -> None:
    """RuntimeError for the two ways a framework can call ``step(closure)`` that the closure form
    cannot serve: ``GradScaler.step(opt, closure)`` (the closure's gradients would stay scaled:
    torch sets ``grad_scale`` / ``found_inf`` first), and Accelerate's ``AcceleratedOptimizer``
    with gradient accumulation (inside ``accumulate()`` it skips ``step`` on the micro-batches that
    do not synchronise, so their closures never run and those batches are silently lost)."""
    name = type(opt).__name__
    if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
        raise RuntimeError(
            f"{name}.step(closure) was called by GradScaler.step(optimizer, closure) (e.g. "
            "Accelerate's fp16 optimizer): the closure's gradients would stay scaled; use "
            "step(closure, scaler=scaler), or samkit.integrations.accelerate.sam_backward"
        )
    wrapper = _accelerate_wrapper_calling()
    if wrapper is not None and wrapper.gradient_state.num_steps > 1:
        raise RuntimeError(
            f"{name}.step(closure) through Accelerate with gradient_accumulation_steps="
            f"{wrapper.gradient_state.num_steps}: inside accelerator.accumulate() Accelerate skips "
            "step() on the micro-batches that do not synchronise, so their closures never run; "
            "use samkit.integrations.accelerate.sam_backward"
        )


def _accelerate_wrapper_calling() -> Any:
    """The ``accelerate`` ``AcceleratedOptimizer`` whose ``step`` is on the call stack, if any
    (only when accelerate is imported; a few frames up: wrapper -> hooks -> this optimizer)."""
    module = sys.modules.get("accelerate.optimizer")
    if module is None:
        return None
    frame = sys._getframe(2)
    for _ in range(10):
        if frame is None:
            return None
        caller = frame.f_locals.get("self")
        if isinstance(caller, module.AcceleratedOptimizer):
            return caller
        frame = frame.f_back
    return None


def refuse_foreign_gradients(opt: Any) -> None:
    """RuntimeError if a parameter holds a non-zero gradient that the last ``step(closure)``
    did not leave (marks are kept by the closure form only: the two-call form costs nothing)."""
    refuse_framework_closure(opt)
    opt.sync_gradients()
    foreign = []
    for g in opt.param_groups:
        for p in g["params"]:
            grad = p.grad
            if grad is None:
                continue
            mark = opt._grad_marks.get(id(p))
            if mark is None or mark[0] is not grad or mark[1] != grad._version:
                foreign.append(numerics.local(grad))
    if foreign and bool(torch.stack([g.ne(0).any().to("cpu") for g in foreign]).any()):
        raise RuntimeError(FOREIGN_GRADIENTS.format(name=type(opt).__name__))


def inverse_scale(scaler: Any) -> float:
    """1 / the loss scale of an enabled ``GradScaler``; 1 without one."""
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return 1.0 / scaler.get_scale()


def back_off_scale(scaler: Any) -> None:
    """Lower the scale of an enabled ``GradScaler`` by its backoff factor (an overflow)."""
    if scaler is not None and scaler.is_enabled():
        scaler.update(new_scale=scaler.get_scale() * scaler.get_backoff_factor())


def check_sam_arguments(
    rho: float, norm: float, adaptive_eta: float, eps: float, ascent_steps: int
) -> None:
    """ValueError naming the first of SAM's arguments out of its domain."""
    if not (math.isfinite(rho) and rho >= 0.0):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    if float(norm) not in (2.0, math.inf):
        raise ValueError(f"norm must be 2 or float('inf'), got {norm!r}")
    if not adaptive_eta >= 0.0:
        raise ValueError(f"adaptive_eta must be >= 0, got {adaptive_eta!r}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if isinstance(ascent_steps, bool) or not isinstance(ascent_steps, int) or ascent_steps < 1:
        raise ValueError(f"ascent_steps must be an integer >= 1, got {ascent_steps!r}")


def check_perturb_option(param_groups: list[dict[str, Any]]) -> None:
    """ValueError unless every group's ``perturb`` (SAM-ON's choice) is a bool."""
    for group in param_groups:
        if not isinstance(group["perturb"], bool):
            raise ValueError(f"perturb must be True or False, got {group['perturb']!r}")
