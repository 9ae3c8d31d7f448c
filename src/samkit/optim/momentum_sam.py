"""Momentum-SAM (Becker, Altrock, Risse, Momentum-SAM: Sharpness Aware Minimization without
Computational Overhead, 2024).

Instead of ascending along the current gradient (an extra pass), MSAM perturbs along the base
optimizer's momentum buffer, which exists before the step's only pass (the paper's Algorithm 1,
with PyTorch's convention ``v <- mu v + g``, so that ``v`` points up the loss like ``g``):

    w~ = w - rho v / ||v||          before the forward (no perturbation while v = 0 or absent)
    g  = grad L(w~)                 the step's only pass
    w  = O(w, g)                    weights restored to w first; O updates v with g

i.e. the perturbation goes along the negative momentum, the direction the next update will move
``w`` in (NAG's look-ahead, scaled to the rho-sphere). ``||v||`` is global over all parameters
(and FSDP shards). The buffer is the base optimizer's ``momentum_buffer`` (SGD) or, failing that,
``exp_avg`` (Adam / AdamW's first moment). Cost: one pass, plus one norm and the backup / restore.

Two-call form: ``pre_perturb()`` before the forward, backward, then ``second_step()`` (or
``step()``, as ``GradScaler.step`` calls it); ``step(closure)`` does all three;
``samkit.train.SharpnessAwareStep`` calls ``pre_perturb`` before its one pass
(``perturbs_before_first_pass``). The loss the pass reports, and the BatchNorm statistics it
updates, are those at ``w~``. The paper tunes rho for MSAM separately from SAM's: tune it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from samkit.optim import _functional as F
from samkit.optim import numerics
from samkit.optim._base import ParamsT, on_owner
from samkit.optim._flat import StepPlan
from samkit.optim.sam import SAM

__all__ = ["MomentumSAM", "MOMENTUM_KEYS"]

#: Where base optimizers keep the momentum MSAM perturbs along, in the order looked for.
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


class MomentumSAM(SAM):
    """Perturb along the negative momentum before the step's only pass (module docstring)."""

    perturbs_before_first_pass = True
    one_first_pass_per_step = True

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        **kwargs: Any,
    ) -> None:
        for key, allowed in (("adaptive", False), ("ascent_steps", 1), ("norm", 2.0)):
            if kwargs.get(key, allowed) != allowed:
                raise ValueError(f"Momentum-SAM takes {key}={allowed!r}, got {kwargs[key]!r}")
        super().__init__(params, base_optimizer, rho, **kwargs)

    def _momenta(self) -> tuple[list[tuple[dict[str, Any], list[Tensor]]], list[Tensor]]:
        """Per param group, the parameters that have a momentum buffer; and the buffers."""
        groups, buffers = [], []
        for group in self.param_groups:
            params = []
            for p in group["params"]:
                state = self.state.get(p, {})
                v = next((state[k] for k in MOMENTUM_KEYS if torch.is_tensor(state.get(k))), None)
                if v is not None:
                    params.append(p)
                    buffers.append(numerics.local(v))
            if params:
                groups.append((group, params))
        return groups, buffers

    @on_owner
    @torch.no_grad()
    def pre_perturb(self) -> bool:
        """Move to ``w~ = w - rho v / ||v||``; call it before the step's forward. False (and no
        perturbation) when ``||v||`` is not finite; no perturbation either while it is 0."""
        self.unperturb()
        self._failed_pass, self._awaiting_second_step = None, True
        self._ascent_skipped = False
        groups, buffers = self._momenta()
        if not groups:  # the first step: no momentum yet
            return True
        plan = StepPlan(groups, self._reduce_keys(), self._store, fast=self.foreach is not False)
        fe = self._plan_foreach(plan)
        _, norm = plan.norm_value(buffers, fe)
        if not math.isfinite(norm):
            return False  # the base optimizer's state is broken; the pass runs at w
        if norm == 0.0:
            return True
        self._save_clean(plan, fe)
        self._perturbed = plan
        shards = plan.shards()
        for (group, _), span in zip(plan.groups, plan.spans):
            F.add_(shards[span], buffers[span], alpha=-group["rho"] / (norm + self.eps),
                   foreach=fe)  # fmt: skip
        return True

    @on_owner
    def first_step(self, *args: Any, **kwargs: Any) -> bool:
        raise RuntimeError(
            "Momentum-SAM has no ascent pass: call pre_perturb() before the forward, then "
            "backward and second_step() (or step(closure))"
        )

    @on_owner
    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor] | None = None, *, scaler: Any = None
    ) -> Tensor | None:
        """``closure`` (zero the grads, forward, backward, return the loss) once, at ``w~``.

        After ``pre_perturb()`` (the two-call form, as ``GradScaler.step`` calls it):
        ``closure`` (if any) is the pass, then ``second_step()``."""
        if self._awaiting_second_step or closure is None:
            return self._finish_step(closure)
        self._refuse_foreign_gradients()
        self.pre_perturb()
        try:
            loss = torch.enable_grad()(closure)()
        except BaseException:
            self.unperturb()
            self._awaiting_second_step = False
            raise
        if scaler is not None and scaler.is_enabled():
            scaler.step(self)
        else:
            self.second_step()
        self._mark_gradients()
        return loss
