"""An exponential moving average of a model's weights and BatchNorm statistics (``--ema-decay``)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """``shadow = decay * shadow + (1 - decay) * current`` after every step taken; integer
    buffers (``num_batches_tracked``) are copied.

    ``into``: a copy of ``model`` (``copy.deepcopy``) whose own weights and buffers become the
    shadow, so that the average can be run as a model (MESA's teacher, samkit.train.trajectory);
    by default the shadow is a dict of clones."""

    def __init__(self, model: nn.Module, decay: float, *, into: nn.Module | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), not {decay}")
        self.decay = decay
        if into is None:
            self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            into.load_state_dict(model.state_dict())
            self.shadow = into.state_dict()  # detached views of into's own tensors

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
