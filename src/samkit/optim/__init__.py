"""Sharpness-aware optimizers: each wraps any ``torch.optim`` optimizer.

``SAM`` and ``ESAM`` are the optimizers; ``samkit.optim.registry`` lists the training methods and
their options (``create_optimizer("esam", params, torch.optim.SGD, beta=0.6, lr=0.1)``);
``samkit.optim.numerics`` holds the gradient norms, clipping and the guarded step they share.
"""

from samkit.optim._base import SharpnessAwareOptimizer, unwrap
from samkit.optim.esam import ESAM
from samkit.optim.registry import (
    OptimInfo,
    OptimOption,
    create_optimizer,
    get_optimizer_info,
    list_optimizers,
    register_optimizer,
)
from samkit.optim.sam import SAM
from samkit.optim.sam_on import sam_on_groups

__all__ = [
    "ESAM",
    "OptimInfo",
    "OptimOption",
    "SAM",
    "SharpnessAwareOptimizer",
    "create_optimizer",
    "get_optimizer_info",
    "list_optimizers",
    "register_optimizer",
    "sam_on_groups",
    "unwrap",
]
