"""An exponential moving average of a model's weights and BatchNorm statistics (``--ema-decay``)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """``shadow = decay * shadow + (1 - decay) * current`` after every step taken; integer
    buffers (``num_batches_tracked``) are copied."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), not {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        floats = [k for k, v in self.shadow.items() if v.is_floating_point()]
        if floats:
            torch._foreach_lerp_(
                [self.shadow[k] for k in floats], [current[k] for k in floats], 1.0 - self.decay
            )
        for k, v in self.shadow.items():
            if not v.is_floating_point():
                v.copy_(current[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in self.shadow.items():
            v.copy_(state[k])
