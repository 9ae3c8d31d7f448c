"""The learning-rate schedule: the seed system's cosine decay from the peak to 0, updated every
step, after an optional linear warm-up (``--warmup-epochs``, as GSAM's and the ViT recipes use).

With ``W`` warm-up steps of ``T`` in all, step ``s`` (0-based: the steps taken before it) runs at

    lr0 * (s + 1) / (W + 1)                                  s < W   (the warm-up)
    lr0 * (1 + cos(pi * (s - W) / (T - W))) / 2              s >= W  (the cosine decay)

so the warm-up climbs in equal steps from lr0 / (W + 1) towards lr0, which the first step of the
decay takes; the decay reaches 0 after the last step. ``W = 0`` is the seed's schedule exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["CosineSchedule", "cosine_lr", "warmup_cosine_lr"]


def cosine_lr(step: int, total_steps: int, base_lr: float) -> float:
    """``0.5 * base_lr * (1 + cos(pi * step / total_steps))``: base_lr at step 0, 0 at the end."""
    t = min(step, total_steps) / max(1, total_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * t))


def warmup_cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """The learning rate of step ``step`` (see the module docstring): a linear warm-up over the
    first ``warmup_steps`` steps, then :func:`cosine_lr` over the remaining ones."""
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    return cosine_lr(step - warmup_steps, total_steps - warmup_steps, base_lr)


class CosineSchedule:
    """:func:`warmup_cosine_lr` per step. ``apply()`` sets the learning rate of the coming step on
    every param group; ``step()`` counts a step. Checkpointable (the count of steps)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
    ):
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, {total_steps}], got {warmup_steps}")
        self.optimizer, self.base_lr, self.total_steps = optimizer, base_lr, total_steps
        self.warmup_steps = warmup_steps
        self.steps_done = 0

    def lr(self) -> float:
        return warmup_cosine_lr(self.steps_done, self.total_steps, self.base_lr, self.warmup_steps)

    def apply(self) -> float:
        lr = self.lr()
        groups = [self.optimizer.param_groups]
        base = getattr(self.optimizer, "base_optimizer", None)
        if base is not None and base.param_groups is not self.optimizer.param_groups:
            groups.append(base.param_groups)
        for param_groups in groups:
            for group in param_groups:
                group["lr"] = lr
        return lr

    def step(self) -> None:
        self.steps_done += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps_done": self.steps_done,
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])
