"""WSAM: weighted sharpness as a regularisation term (Yue et al., KDD 2023).

WSAM minimises L(w) + gamma / (1 - gamma) * (max_{||e|| <= rho} L(w + e) - L(w)), whose gradient
is, with a = gamma / (1 - gamma) and SAM's perturbed gradient g_p = grad L(w + e):

    g_wsam = g + a (g_p - g)

* ``decouple=False`` (coupled): the base optimizer steps with g_wsam;
* ``decouple=True`` (the paper's default): the base optimizer steps with the clean g, and the
  sharpness term is applied outside it, as AdamW decouples weight decay:
  ``w <- base_step(w, g) - lr a (g_p - g)``.

gamma = 0.5 (a = 1, coupled) is SAM; gamma = 0 is the base optimizer alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from samkit.optim import _functional as F
from samkit.optim._base import ParamsT
from samkit.optim.numerics import local
from samkit.optim.sam import SAM

__all__ = ["WSAM"]


class WSAM(SAM):
    """SAM with the sharpness weighted by gamma / (1 - gamma) (see the module docstring)."""

    stores_clean_gradient = True
    one_first_pass_per_step = True

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        gamma: float = 0.9,
        decouple: bool = True,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma!r}")
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.gamma, self.decouple = gamma, decouple
        self.weight = gamma / (1.0 - gamma)
        self._sharpness: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]] = []

    def _combine_gradients(self, params: list[Tensor], grads: list[Tensor]) -> None:
        clean = self._clean_grads(params)
        fe = self._foreach(grads)
        if not self.decouple:  # g + a (g_p - g) = a g_p + (1 - a) g
            F.scale_(grads, self.weight, foreach=fe)
            F.add_(grads, clean, alpha=1.0 - self.weight, foreach=fe)
            return
        sharp = F.scaled(grads, 1.0, foreach=fe)  # a copy of g_p ...
        F.add_(sharp, clean, alpha=-1.0, foreach=fe)  # ... minus g
        F.copy_(grads, clean, foreach=fe)  # the base optimizer steps with g
        by_param = dict(zip(params, sharp))
        self._sharpness = [
            (
                g,
                [p for p in g["params"] if p in by_param],
                [by_param[p] for p in g["params"] if p in by_param],
            )
            for g in self.param_groups
        ]

    @torch.no_grad()
    def _after_step(self, took: bool) -> None:
        if took and self.decouple:
            for group, params, sharp in self._sharpness:
                if params:
                    shards = [local(p) for p in params]
                    F.add_(shards, sharp, alpha=-group["lr"] * self.weight,
                           foreach=self._foreach(shards))  # fmt: skip
        self._sharpness = []
