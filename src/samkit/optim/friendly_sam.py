"""Friendly-SAM (Li et al., CVPR 2024): perturb without the full-gradient component.

The paper finds that the full-gradient component of SAM's perturbation does not help
generalisation; Friendly-SAM estimates it by an exponential moving average of the stochastic
gradients and removes it (the paper's Eq. for F-SAM):

    m  <- lambda m + (1 - lambda) g                       the full-gradient estimate
    d  = g - sigma m                                      the batch-specific part
    e  = rho d / ||d||                                    (ASAM: rho T^2 d / ||T d||)
    update: the base optimizer steps with grad L(w + e), as SAM

The moving average moves only with steps that are taken (a skipped step leaves it unchanged) and
is part of ``state_dict()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from samkit.optim import _functional as F
from samkit.optim._base import ParamsT, on_owner
from samkit.optim.sam import SAM

__all__ = ["FriendlySAM"]


class FriendlySAM(SAM):
    """SAM perturbing along ``g - sigma m`` (see the module docstring)."""

    one_first_pass_per_step = True

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        sigma: float = 1.0,
        lmbda: float = 0.95,
        **kwargs: Any,
    ) -> None:
        if not sigma >= 0.0:
            raise ValueError(f"sigma must be >= 0, got {sigma!r}")
        if not 0.0 <= lmbda < 1.0:
            raise ValueError(f"lmbda must be in [0, 1), got {lmbda!r}")
        if kwargs.get("ascent_steps", 1) != 1:
            raise ValueError("Friendly-SAM takes one ascent step")
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.sigma, self.lmbda = sigma, lmbda
        self._momentum: dict[Tensor, Tensor] = {}  # m, per parameter (this rank's shard)
        self._pending: dict[Tensor, Tensor] = {}  # this step's new m, kept if the step is taken

    def _ascent_gradients(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        fe = self._foreach(grads)
        old = [self._momentum.get(p, torch.zeros_like(g)) for p, g in zip(params, grads)]
        new = F.scaled(old, self.lmbda, foreach=fe)
        F.add_(new, grads, alpha=1.0 - self.lmbda, foreach=fe)
        self._pending.update(zip(params, new))
        direction = F.scaled(new, -self.sigma, foreach=fe)
        F.add_(direction, grads, foreach=fe)
        return direction

    def _after_step(self, took: bool) -> None:
        if took:
            self._momentum.update(self._pending)
        self._pending = {}

    @on_owner
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["samkit"]["friendly_momentum"] = self._per_param_list(self._momentum)
        return state

    @on_owner
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("samkit", {}).get("friendly_momentum")
        super().load_state_dict(state_dict)
        self._momentum = self._per_param_dict(saved)
