"""The seed system's learning-rate schedule: cosine decay from the peak to 0, updated every step."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["CosineSchedule", "cosine_lr"]


def cosine_lr(step: int, total_steps: int, base_lr: float) -> float:
    """``0.5 * base_lr * (1 + cos(pi * step / total_steps))``: base_lr at step 0, 0 at the end."""
    t = min(step, total_steps) / max(1, total_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * t))


class CosineSchedule:
    """:func:`cosine_lr` per step. ``apply()`` sets the learning rate of the coming step on every
    param group; ``step()`` counts a step. Checkpointable."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, total_steps: int):
        self.optimizer, self.base_lr, self.total_steps = optimizer, base_lr, total_steps
        self.steps_done = 0

    def lr(self) -> float:
        return cosine_lr(self.steps_done, self.total_steps, self.base_lr)

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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])
