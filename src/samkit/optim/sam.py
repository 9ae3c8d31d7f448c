"""SAM: Sharpness-Aware Minimization (Foret et al., ICLR 2021), with ASAM (Kwon et al., ICML 2021).

SAM minimises ``max_{||e||_p <= rho} L(w + e)``. One step, with base optimizer ``O``:

    g      = grad L(w)                                     first pass
    e      = rho * g / (||g||_2 + eps)                      p = 2 (default; norm over ALL params)
    e      = rho * sign(g)                                  p = inf
    e      = rho * T^2 g / (||T g||_2 + eps), T = |w| + eta  adaptive (ASAM), T^2 -> T for p = inf
    g_sam  = grad L(w + e)                                  second pass
    w      = O(w, g_sam)                                    weights restored to w first

With ``ascent_steps = k > 1`` the inner maximisation is k steps of projected gradient ascent on the
rho-ball (paper App. C.6). In the scaled coordinates ``y = e / (rho T)`` the ball is the unit ball:
``y <- Proj(y + dir(T g))`` with ``dir`` the normalised (p = 2) or sign (p = inf) ascent direction;
the first step from ``y = 0`` is the ordinary SAM step above. (Variants: ``_base``'s hooks.)

A param group with ``perturb=False`` stays at ``w``, out of ``||g||``, and is still updated with
``g_sam`` (SAM-ON: only normalisation layers perturbed, ``samkit.optim.sam_on.sam_on_groups``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from samkit.optim import _conventions
from samkit.optim import _functional as F
from samkit.optim._base import (
    ParamsT,
    SharpnessAwareOptimizer,
    _refuse_sparse,
    on_owner,
)
from samkit.optim._conventions import back_off_scale, inverse_scale


class SAM(SharpnessAwareOptimizer):
    """Wrap any ``torch.optim`` optimizer with a sharpness-aware ascent step.

    ``base_optimizer`` is an optimizer class (built here on the same param groups with
    ``base_kwargs``) or an optimizer instance over the same parameters; its ``param_groups`` and
    ``state`` are shared (see ``SharpnessAwareOptimizer``). ``rho`` and ``adaptive`` may differ per
    param group, and so may ``perturb`` (False: the group is not perturbed and not in the norm,
    only updated; see the module docstring). Usage, as in davda54/sam::

        loss_fn(model(x), y).backward()
        optimizer.first_step(zero_grad=True)   # w -> w + e
        loss_fn(model(x), y).backward()
        optimizer.second_step(zero_grad=True)  # back to w, base step with grad L(w + e)

    Non-finite gradients in either pass skip the whole step (weights and optimizer state untouched):
    ``second_step`` returns False, ``skipped_steps`` counts it and a ``RuntimeWarning`` is issued.

    Sharded parameters (FSDP): norms are summed over the shards, automatically for DTensors
    (FSDP2), over ``shard_group`` (a process group, or True) for FSDP1's flat shards. Under DDP
    leave it None: each replica perturbs with its own gradient (the paper's m-sharpness).
    ``flat=True``: parameters and gradients in one buffer per group (``_flat_params``), for speed.
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        norm: float = 2.0,
        adaptive: bool = False,
        adaptive_eta: float = 0.01,
        eps: float = 1e-12,
        foreach: bool | None = None,
        ascent_steps: int = 1,
        shard_group: Any = None,
        flat: bool = False,
        **base_kwargs: Any,
    ) -> None:
        _conventions.check_sam_arguments(rho, norm, adaptive_eta, eps, ascent_steps)
        self.norm, self.eps, self.ascent_steps = float(norm), eps, ascent_steps
        defaults = dict(rho=rho, adaptive=adaptive, adaptive_eta=adaptive_eta, perturb=True)
        super().__init__(params, base_optimizer, defaults, foreach, base_kwargs, shard_group, flat)
        _conventions.check_perturb_option(self.param_groups)
        self._ascent_y: list[list[Tensor]] = []

    @on_owner
    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = False, *, scaler: Any = None, back_off: bool = True
    ) -> bool:
        """Move to ``w + e`` from the gradients of the first pass. False if they are non-finite.
        ``scaler``: fp16's ``GradScaler`` whose scaled loss made them: unscaled first; an overflow
        backs its scale off at once (``back_off``): ``scaler.step`` sees only the second pass."""
        self.unperturb()  # a repeated first_step starts from the clean weights, never from w + e
        self._failed_pass, self._awaiting_second_step = None, True
        self._ascent_skipped = False
        plan = self._plan()  # the parameters with a gradient, per group
        _refuse_sparse(plan.params)
        self._unscale(plan, inverse_scale(scaler))
        if self.stores_clean_gradient:  # GSAM, WSAM: the update combines g with grad L(w + e)
            self._store_clean_grads(plan.params, plan.grads())
        if not all(g.get("perturb", True) for g in self.param_groups):  # SAM-ON
            plan = self._plan(perturbed_only=True)
        self._perturbed = plan  # what moves to w + e, and what the norm of e is taken over
        ok = self._ascend(first=True, rho_factor=self._rho_factor())
        if not ok and back_off:
            back_off_scale(scaler)
        if zero_grad:
            self._zero_grad_synced()
        return ok

    @on_owner
    @torch.no_grad()
    def ascent_step(
        self, zero_grad: bool = False, *, scaler: Any = None, back_off: bool = True
    ) -> bool:
        """One more projected ascent step from the gradients at the current ``w + e``."""
        if not self._ascent_y:
            raise RuntimeError("ascent_step() needs first_step() first, with ascent_steps > 1")
        self._unscale(self._perturbed, inverse_scale(scaler))
        ok = self._ascend(first=False, rho_factor=self._rho_factor())
        if not ok and back_off:
            back_off_scale(scaler)
        if zero_grad:
            self.zero_grad()
        return ok

    def _ascend(self, first: bool, rho_factor: float) -> bool:
        plan = self._perturbed
        if plan is None or not plan.params:  # no gradient anywhere: e = 0
            self._ascent_y = []
            return True
        fe = self._plan_foreach(plan)
        # the tensors to move (under FSDP this rank's shards; norms sum over them) and, per
        # group, T (or None) and T g (or g)
        shards = plan.shards()
        clean = shards if first else plan.backups()
        grads = plan.grads(zeros_for_missing=not first)
        if first:
            grads = self._ascent_gradients(plan.params, grads)
        scalings, directions = [], []
        for (group, _), span in zip(plan.groups, plan.spans):
            t = (
                F.abs_plus(clean[span], group["adaptive_eta"], foreach=fe)
                if group["adaptive"]
                else None
            )
            scalings.append(t)
            directions.append(grads[span] if t is None else F.mul(t, grads[span], foreach=fe))
        flat_directions = [u for us in directions for u in us]
        _, grad_norm = plan.norm_value(flat_directions, fe)  # the one sync
        if not math.isfinite(grad_norm):
            self._failed_pass = self._failed_pass or ("first" if first else "ascent")
            if first:
                self._perturbed = None  # nothing has moved yet; the backups are stale
            else:
                self.unperturb()
            return False
        if self.norm == 2.0:  # y = coef * base, materialised only when kept for more steps
            coef, base = 1.0 / (grad_norm + self.eps), directions
        else:
            coef, base = 1.0, [F.sign(us, foreach=fe) for us in directions]
        if first:
            self._save_clean(plan, fe)
            if self.ascent_steps > 1:
                coef, base = 1.0, [F.scaled(us, coef, foreach=fe) for us in base]
        else:  # projected ascent in the scaled coordinates, back onto the unit ball
            for y, us in zip(self._ascent_y, base):
                F.add_(y, us, alpha=coef, foreach=fe)
            coef, base = 1.0, self._ascent_y
            F.project_to_unit_ball_([y for ys in base for y in ys], self.norm, plan.norm, fe)
            plan.restore(fe)
            self._weights_written()
        for (group, _), span, t, us in zip(plan.groups, plan.spans, scalings, base):
            rho = self._group_rho(group) * rho_factor * coef
            if t is None:
                F.add_(shards[span], us, alpha=rho, foreach=fe)
            else:  # e = rho T y: for p = 2 that is rho T^2 g / ||T g||
                F.addcmul_(shards[span], t, us, value=rho, foreach=fe)
        self._ascent_y = base if self.ascent_steps > 1 else []
        return True

    @on_owner
    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor] | None = None, *, scaler: Any = None
    ) -> Tensor | None:
        """Both passes: ``closure`` zeroes the grads, runs forward + backward, returns the loss.
        After ``first_step()`` (as GradScaler, Accelerate, Lightning call it): ``closure`` (if
        any) is the second pass, then ``second_step()``. ``scaler``: fp16's ``GradScaler``, whose
        scaled loss the closure backpropagates (call ``scaler.update()`` afterwards)."""
        return _conventions.two_pass_step(self, closure, scaler)

    def _restore(self) -> bool:
        self._ascent_y = []
        return super()._restore()
