"""Weight initialisation shared by the CIFAR-style residual networks."""

from __future__ import annotations

from torch import nn


def init_residual_network(model: nn.Module) -> None:
    """He (fan-out) init for convolutions, BatchNorm as identity, zero linear biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
