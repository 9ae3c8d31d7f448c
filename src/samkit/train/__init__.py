"""Training: the sharpness-aware step helper and (``samkit train``) the training loop."""

from samkit.train.step import SharpnessAwareStep, StepOutput

__all__ = ["SharpnessAwareStep", "StepOutput"]
