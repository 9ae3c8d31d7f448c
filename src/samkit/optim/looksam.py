"""LookSAM (Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization, CVPR 2022).

SAM's perturbed gradient ``g_s`` differs from the clean one ``g`` mostly by a component ``g_v``
orthogonal to ``g`` that changes slowly. LookSAM computes it every ``k`` steps and reuses it in
between (the paper's Algorithm 1):

    t % k == 0:  g_s = grad L(w + rho g / ||g||)                    SAM's two passes
                 g_v = g_s - (<g_s, g> / ||g||^2) g                 kept
                 update: g_s
    otherwise:   update: g + alpha (||g|| / ||g_v||) g_v            one pass

Norms and inner products are global, over all parameters (and FSDP shards) as one vector, as in
the paper's Algorithm 1 (its layer-wise variant, Look-LayerSAM, is for large-batch training with
LAMB and is not this class). Cost ``1 + 1/k`` passes per step. The cycle is an
:class:`~samkit.optim.ascent_policy.EveryKPolicy`; the in-between update is the hook
``_combine_without_ascent``. ``g_v`` moves only with SAM steps that are taken, is zero before the
first one (the first step, ``t = 0``, is a SAM step), and is part of ``state_dict()``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from samkit.optim import _functional as F
from samkit.optim._base import ParamsT, on_owner
from samkit.optim.ascent_policy import EveryKPolicy
from samkit.optim.sam import SAM

__all__ = ["LookSAM"]


class LookSAM(SAM):
    """SAM every ``k`` steps, its orthogonal component reused in between (module docstring)."""

    stores_clean_gradient = True
    one_first_pass_per_step = True

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        k: int = 5,
        alpha: float = 0.7,
        **kwargs: Any,
    ) -> None:
        if not (math.isfinite(alpha) and alpha >= 0.0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if kwargs.get("ascent_steps", 1) != 1:
            raise ValueError("LookSAM takes one ascent step")
        policy = EveryKPolicy(k)
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.k, self.alpha, self.ascent_policy = k, alpha, policy
        self._gv: dict[Tensor, Tensor] = {}  # g_v per parameter (this rank's shard)
        self._pending: dict[Tensor, Tensor] = {}  # this step's new g_v, kept if it is taken

    def _combine_gradients(self, params: list[Tensor], grads: list[Tensor]) -> None:
        clean = self._clean_grads(params)
        g_squared = self._dot(clean, clean, params)
        coef = self._dot(grads, clean, params) / g_squared if g_squared > 0.0 else 0.0
        fe = self._foreach(grads)
        g_v = F.scaled(clean, -coef, foreach=fe)
        F.add_(g_v, grads, foreach=fe)  # g_s - coef g; the update stays g_s
        self._pending = dict(zip(params, g_v))

    def _combine_without_ascent(self, params: list[Tensor], grads: list[Tensor]) -> None:
        if not self._gv:
            return
        g_v = [self._gv.get(p) for p in params]
        g_v = [torch.zeros_like(g) if v is None else v for v, g in zip(g_v, grads)]
        gv_squared = self._dot(g_v, g_v, params)
        if not gv_squared > 0.0:  # zero (or non-finite: the step is skipped anyway)
            return
        scale = self.alpha * math.sqrt(self._dot(grads, grads, params) / gv_squared)
        F.add_(grads, g_v, alpha=scale, foreach=self._foreach(grads))

    def _after_step(self, took: bool) -> None:
        if took:
            self._gv.update(self._pending)
        self._pending = {}

    @on_owner
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["samkit"]["looksam_gv"] = self._per_param_list(self._gv)
        return state

    @on_owner
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("samkit", {}).get("looksam_gv")
        super().load_state_dict(state_dict)
        self._gv = self._per_param_dict(saved)
