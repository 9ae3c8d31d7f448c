"""samkit: sharpness-aware training (SAM, ASAM, ESAM) for PyTorch."""

from samkit.optim import ESAM, SAM
from samkit.train.step import SharpnessAwareStep, StepOutput

__version__ = "0.1.0"

__all__ = ["ESAM", "SAM", "SharpnessAwareStep", "StepOutput", "__version__"]
