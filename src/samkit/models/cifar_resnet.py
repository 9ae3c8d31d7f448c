"""ResNets for 32x32 images: the CIFAR ResNet-6n+2 of He et al. (CVPR 2016, Sec. 4.2) and the
ResNet-18 with a 3x3 stem used in ESAM and much CIFAR work.

Both use post-activation basic blocks ``conv3x3-BN-ReLU-conv3x3-BN (+ shortcut) - ReLU``.

``resnet32`` (He et al.): a 3x3 stem convolution with 16 channels (+BN-ReLU), three stages of
``n = (depth - 2) / 6 = 5`` blocks with 16, 32 and 64 channels at strides 1, 2, 2, global average
pooling and a linear classifier. Shortcuts use **option A**, the paper's choice for its CIFAR
experiments: the identity, subsampled by 2 and zero-padded with the missing channels when the
shape changes, so shortcuts add no parameters and the model has the paper's 0.46M parameters.
``shortcut="B"`` switches to 1x1 convolution + BN projections where the shape changes.

``resnet18_cifar``: a 3x3 stride-1 stem convolution with 64 channels (+BN-ReLU) and no max
pooling, then four stages of two blocks with 64, 128, 256 and 512 channels at strides 1, 2, 2, 2
(1x1 convolution + BN projections where the shape changes), global average pooling and a linear
classifier (~11.2M parameters).

Both take ``width_mult`` (scales every width; e.g. 0.25 for tiny test models).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from samkit.models._init import init_residual_network
from samkit.models.registry import register_model

__all__ = ["CifarBasicBlock", "CifarResNet"]


class CifarBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus an option-A (zero-pad) or option-B (1x1 conv) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.stride, self.pad_channels = stride, 0
        self.projection: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            if shortcut == "A":
                if out_ch < in_ch:
                    raise ValueError("option-A shortcuts cannot reduce the width")
                self.pad_channels = out_ch - in_ch
            else:
                self.projection = nn.Sequential(
                    nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
                )

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            return self.projection(x)
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad_channels))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class CifarResNet(nn.Module):
    """Stem (3x3 conv-BN-ReLU, stride 1, no pooling), stages of basic blocks, avg pool, linear."""

    def __init__(
        self,
        widths: Sequence[int],
        depths: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: str = "B",
        stem_width: int | None = None,
    ):
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        if len(widths) != len(depths) or not widths or min(depths) < 1:
            raise ValueError("widths and depths must be non-empty, of equal length, depths >= 1")
        stem_width = widths[0] if stem_width is None else stem_width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        in_ch = stem_width
        for i, (width, depth) in enumerate(zip(widths, depths)):
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(CifarBasicBlock(in_ch, width, stride, shortcut))
                in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)
        init_residual_network(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _scaled(widths: Sequence[int], width_mult: float) -> list[int]:
    if not width_mult > 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    return [max(1, int(round(w * width_mult))) for w in widths]


@register_model
def resnet32(
    num_classes: int = 10,
    in_channels: int = 3,
    *,
    depth: int = 32,
    width_mult: float = 1.0,
    shortcut: str = "A",
) -> CifarResNet:
    """He et al.'s CIFAR ResNet-32 (0.46M parameters, option-A shortcuts); ``depth = 6n + 2``."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    widths = _scaled((16, 32, 64), width_mult)
    return CifarResNet(widths, (n, n, n), num_classes, in_channels, shortcut=shortcut)


@register_model
def resnet18_cifar(
    num_classes: int = 10, in_channels: int = 3, *, width_mult: float = 1.0
) -> CifarResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max pooling (~11.2M parameters)."""
    widths = _scaled((64, 128, 256, 512), width_mult)
    return CifarResNet(widths, (2, 2, 2, 2), num_classes, in_channels, shortcut="B")
