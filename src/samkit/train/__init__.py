"""Training: the sharpness-aware step helper and (``samkit train``) the training loop.

``SharpnessAwareStep`` is the library entry point; ``samkit.train.loop.train(TrainConfig(...))``
runs the ``samkit train`` job from Python.
"""

from samkit.train.step import SharpnessAwareStep, StepOutput

__all__ = ["SharpnessAwareStep", "StepOutput"]
