"""``samkit`` with one more model, ``nobn_cnn`` (no BatchNorm), for the distributed tests.

Run as ``python nobn_entry.py train ...`` or ``torchrun ... nobn_entry.py train ...``. Without
BatchNorm every forward is independent of how the batch is split, so DDP with synchronised
perturbations can equal single-process SAM on the global batch exactly.
"""

import sys

from torch import nn

from samkit.cli import main
from samkit.models.registry import register_model


@register_model
def nobn_cnn(num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


if __name__ == "__main__":
    sys.exit(main())
