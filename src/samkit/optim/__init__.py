"""Sharpness-aware optimizers: each wraps any ``torch.optim`` optimizer."""

from samkit.optim.esam import ESAM
from samkit.optim.sam import SAM

__all__ = ["ESAM", "SAM"]
