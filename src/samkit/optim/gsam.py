"""GSAM: Surrogate Gap Guided Sharpness-Aware Minimization (Zhuang et al., ICLR 2022).

SAM's perturbed gradient minimises the perturbed loss L(w + e); GSAM also shrinks the surrogate
gap h(w) = L(w + e) - L(w) by ascending L(w) only orthogonally to it (the paper's Algorithm 1):

    g      = grad L(w)                                   first pass (kept)
    g_p    = grad L(w + e),  e = rho_t g / ||g||          second pass, as SAM
    g_perp = g - (<g, g_p> / ||g_p||^2) g_p               the part of g orthogonal to g_p
    update = g_p - alpha g_perp                           what the base optimizer steps with

rho_t follows the learning rate (paper Sec. 4, rho_t scheduled in proportion to the learning
rate):

    rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min)

where lr_max is each param group's learning rate when GSAM is built and lr_t its current one (set
by any LR scheduler); ``rho_min = rho`` keeps rho constant. The inner products are global over all
parameters (and over FSDP shards), as SAM's norm.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from samkit.optim import _functional as F
from samkit.optim._base import ParamsT
from samkit.optim.sam import SAM

__all__ = ["GSAM"]


class GSAM(SAM):
    """SAM whose update also descends the surrogate gap (see the module docstring)."""

    stores_clean_gradient = True
    one_first_pass_per_step = True

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        alpha: float = 0.2,
        rho_min: float = 0.0,
        lr_min: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not alpha >= 0.0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        if not 0.0 <= rho_min <= rho:
            raise ValueError(f"rho_min must be in [0, rho] = [0, {rho}], got {rho_min!r}")
        if not lr_min >= 0.0:
            raise ValueError(f"lr_min must be >= 0, got {lr_min!r}")
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.alpha, self.rho_min, self.lr_min = alpha, rho_min, lr_min
        for group in self.param_groups:  # in the state dict with the groups, so it round-trips
            group.setdefault("gsam_lr_max", group["lr"])

    def _group_rho(self, group: dict[str, Any]) -> float:
        span = group["gsam_lr_max"] - self.lr_min
        t = (group["lr"] - self.lr_min) / span if span > 0 else 1.0
        t = min(1.0, max(0.0, t))  # a warm-up past lr_max keeps rho, not more
        return self.rho_min + (group["rho"] - self.rho_min) * t

    def _combine_gradients(self, params: list[Tensor], grads: list[Tensor]) -> None:
        clean = self._clean_grads(params)
        gp_squared = self._dot(grads, grads, params)
        if gp_squared == 0.0:  # no perturbed gradient to project on: g_perp = g
            F.add_(grads, clean, alpha=-self.alpha, foreach=self._foreach(grads))
            return
        coef = self._dot(clean, grads, params) / gp_squared
        # g_p - alpha (g - coef g_p) = (1 + alpha coef) g_p - alpha g
        F.scale_(grads, 1.0 + self.alpha * coef, foreach=self._foreach(grads))
        F.add_(grads, clean, alpha=-self.alpha, foreach=self._foreach(grads))
