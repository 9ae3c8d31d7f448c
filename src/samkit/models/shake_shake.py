"""Shake-Shake regularised ResNets (Gastaldi, 2017), "Shake-Shake-Image", for 32x32 images.

Shake-Shake 26 2x96d: a 3x3 stem convolution with 16 channels (+BN), three stages of
``n = (depth - 2) / 6 = 4`` blocks with ``w``, ``2w`` and ``4w`` channels (``w = 96``) at
strides 1, 2, 2, then ReLU, global average pooling and a linear classifier (~26.2M parameters).
Each block adds to its shortcut two residual branches ``ReLU-conv3x3-BN-ReLU-conv3x3-BN``
combined as

    forward:   alpha * b1(x) + (1 - alpha) * b2(x),   alpha ~ U(0, 1) per sample
    backward:  beta * g  and  (1 - beta) * g,          beta  ~ U(0, 1) per sample, independent

and at evaluation ``0.5 * (b1(x) + b2(x))``. ``alpha`` and ``beta`` are both drawn in the
forward pass (one ``torch.rand`` call on the input's device, default generator, float32), so
restoring the RNG state before a forward pass (as SAM's two passes do) replays both exactly;
no random numbers are drawn during ``backward``.

Shortcuts: identity when the shape is unchanged; a 1x1 convolution + BN for the first stage
(channel change at stride 1); and, when downsampling, the paper's two concatenated flows, each
a stride-2 1x1 average pooling (subsampling) followed by a 1x1 convolution with half the output
channels, the second flow's input shifted by one pixel right and down, then BN.

Registered names: ``WideResnet28x6_ShakeShake`` (the seed system's name for this model) and
``shake_shake_26_2x96d``; both accept ``width`` (first-stage width, default 96) and ``depth``
(``6n + 2``, default 26) so that tests can build tiny instances.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from samkit.models._init import init_residual_network
from samkit.models.registry import register_model

__all__ = ["ShakeShakeBlock", "ShakeShakeFunction", "ShakeShakeResNet", "shake_shake"]


class ShakeShakeFunction(torch.autograd.Function):
    """``alpha * x1 + (1 - alpha) * x2`` forward; gradients ``beta * g``, ``(1 - beta) * g``."""

    @staticmethod
    def forward(ctx, x1, x2, alpha, beta):  # type: ignore[override]
        ctx.save_for_backward(beta)
        return alpha * x1 + (1.0 - alpha) * x2

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (beta,) = ctx.saved_tensors
        return beta * grad, (1.0 - beta) * grad, None, None


def shake_shake(
    x1: torch.Tensor, x2: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """Combine two branches with forward weight ``alpha`` and backward weight ``beta``
    (both broadcastable to the branches, e.g. of shape ``(B, 1, 1, 1)``)."""
    return ShakeShakeFunction.apply(x1, x2, alpha, beta)


def _branch(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class _TwoFlowDownsample(nn.Module):
    """Gastaldi's downsampling shortcut: two subsampled 1x1-conv flows (one shifted), concat, BN."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        if out_ch % 2:
            raise ValueError(f"the downsampling shortcut needs an even width, got {out_ch}")
        self.conv1 = nn.Conv2d(in_ch, out_ch // 2, 1, bias=False)
        self.conv2 = nn.Conv2d(in_ch, out_ch // 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x[:, :, ::2, ::2])
        # Shift by one pixel right and down (zero padding) so that the subsampling reads the
        # other positions; (left, right, top, bottom) padding of the last two dimensions.
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        b = self.conv2(shifted[:, :, ::2, ::2])
        return self.bn(torch.cat([a, b], dim=1))


class ShakeShakeBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.branch1 = _branch(in_ch, out_ch, stride)
        self.branch2 = _branch(in_ch, out_ch, stride)
        self.shortcut: nn.Module
        if stride == 2:
            self.shortcut = _TwoFlowDownsample(in_ch, out_ch)
        elif stride == 1 and in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)
            )
        elif stride == 1:
            self.shortcut = nn.Identity()
        else:
            raise ValueError(f"stride must be 1 or 2, got {stride}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.branch1(x), self.branch2(x)
        if self.training:
            # alpha (forward) and beta (backward): one draw, per sample, on x's device.
            r = torch.rand(2, x.shape[0], 1, 1, 1, device=x.device).to(b1.dtype)
            mixed = shake_shake(b1, b2, r[0], r[1])
        else:
            mixed = 0.5 * (b1 + b2)
        return self.shortcut(x) + mixed


class ShakeShakeResNet(nn.Module):
    """Shake-Shake ``depth`` 2x``width``d (two branches per block)."""

    def __init__(
        self,
        depth: int = 26,
        width: int = 96,
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"Shake-Shake depth must be 6n + 2 with n >= 1, got {depth}")
        if width < 2 or width % 2:
            raise ValueError(f"width must be an even number >= 2, got {width}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        )
        blocks: list[nn.Module] = []
        in_ch = 16
        for out_ch, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            for j in range(n):
                blocks.append(ShakeShakeBlock(in_ch, out_ch, stride if j == 0 else 1))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)
        init_residual_network(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model
def shake_shake_26_2x96d(num_classes: int = 10, in_channels: int = 3, **kw) -> ShakeShakeResNet:
    """Shake-Shake 26 2x96d (Gastaldi 2017), ~26.2M parameters."""
    kw = {"depth": 26, "width": 96, **kw}
    return ShakeShakeResNet(num_classes=num_classes, in_channels=in_channels, **kw)


@register_model
def WideResnet28x6_ShakeShake(  # noqa: N802
    num_classes: int = 10, in_channels: int = 3, **kw
) -> ShakeShakeResNet:
    """The seed system's name for Shake-Shake 26 2x96d."""
    return shake_shake_26_2x96d(num_classes, in_channels, **kw)
