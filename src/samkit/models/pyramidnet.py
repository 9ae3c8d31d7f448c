"""PyramidNet (Han, Kim & Kim, CVPR 2017) with optional ShakeDrop (Yamada et al., 2018).

Additive PyramidNet for 32x32 images: a 3x3 stem convolution with 16 channels (+BN), then
``N`` residual units in three stages (the first unit of stages 2 and 3 has stride 2); unit
``k = 1..N`` has width ``D_k = floor(16 + alpha * k / N)``, so the width grows linearly by
``alpha`` in total. ``N = 3 (depth - 2) / 6`` basic units or ``N = 3 (depth - 2) / 9``
bottleneck units. Units (no ReLU before the first convolution, BN after the last)::

    basic:       BN - conv3x3(stride) - BN - ReLU - conv3x3 - BN                    -> D_k
    bottleneck:  BN - conv1x1 - BN - ReLU - conv3x3(stride) - BN - ReLU - conv1x1 - BN -> 4 D_k

The shortcut is the identity, zero-padded with the missing channels; when downsampling the
input is first average-pooled 2x2 with stride 2. The network ends with BN-ReLU, global
average pooling and a linear classifier.

ShakeDrop replaces ``x + F(x)`` by ``x + s * F(x)`` in unit ``l = 1..L`` with, per sample,

    forward:   s = b + alpha - b * alpha,  b ~ Bernoulli(p_l), alpha ~ U(-1, 1)
    backward:  s = b + beta - b * beta,    beta ~ U(0, 1)   (same b)
    eval:      s = E[b + alpha - b * alpha] = p_l

with ``p_l = 1 - (l / L) (1 - p_L)`` decaying linearly to ``p_L = 0.5`` at the last unit.
``b``, ``alpha`` and ``beta`` are drawn together in the forward pass (one ``torch.rand`` call on
the input's device, default generator, float32), so restoring the RNG state before a forward
pass replays them exactly; nothing random happens during ``backward``.

Registered names: ``Pyramid_ShakeDrop`` (the seed's: depth 272, alpha 200, bottleneck,
ShakeDrop; ~26.0M parameters), ``pyramidnet_110_270`` (as in ESAM: depth 110, alpha 270, basic
units, no ShakeDrop; ~28.3M parameters) and ``pyramidnet_110_270_shakedrop``. All accept
``depth``, ``alpha``, ``bottleneck``, ``shakedrop`` and ``p_last`` keywords.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from samkit.models._init import init_residual_network
from samkit.models.registry import register_model

__all__ = ["PyramidNet", "ShakeDrop", "ShakeDropFunction", "shake_drop"]


class ShakeDropFunction(torch.autograd.Function):
    """``x * (b + alpha - b alpha)`` forward; ``g * (b + beta - b beta)`` backward."""

    @staticmethod
    def forward(ctx, x, gate, alpha, beta):  # type: ignore[override]
        ctx.save_for_backward(gate, beta)
        return x * (gate + alpha - gate * alpha)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        gate, beta = ctx.saved_tensors
        return grad * (gate + beta - gate * beta), None, None, None


def shake_drop(
    x: torch.Tensor, gate: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """Apply ShakeDrop with explicit ``gate`` (0/1), ``alpha`` and ``beta`` (broadcastable)."""
    return ShakeDropFunction.apply(x, gate, alpha, beta)


class ShakeDrop(nn.Module):
    """ShakeDrop on a residual branch's output, survival probability ``p``."""

    def __init__(self, p: float, alpha_range: tuple[float, float] = (-1.0, 1.0)):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"survival probability must be in [0, 1], got {p}")
        self.p = float(p)
        self.alpha_range = (float(alpha_range[0]), float(alpha_range[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.alpha_range
        if not self.training:
            return x * (self.p + (1.0 - self.p) * 0.5 * (lo + hi))
        r = torch.rand(3, x.shape[0], *([1] * (x.dim() - 1)), device=x.device)
        gate = (r[0] < self.p).to(x.dtype)
        alpha = (lo + (hi - lo) * r[1]).to(x.dtype)
        return shake_drop(x, gate, alpha, r[2].to(x.dtype))

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}, alpha_range={self.alpha_range}"


class _PyramidUnit(nn.Module):
    def __init__(
        self,
        in_ch: int,
        width: int,
        stride: int,
        bottleneck: bool,
        survival: float | None,
    ):
        super().__init__()
        self.out_ch = 4 * width if bottleneck else width
        if bottleneck:
            self.branch = nn.Sequential(
                nn.BatchNorm2d(in_ch),
                nn.Conv2d(in_ch, width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, self.out_ch, 1, bias=False),
                nn.BatchNorm2d(self.out_ch),
            )
        else:
            self.branch = nn.Sequential(
                nn.BatchNorm2d(in_ch),
                nn.Conv2d(in_ch, width, 3, stride, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, 1, 1, bias=False),
                nn.BatchNorm2d(width),
            )
        if self.out_ch < in_ch:
            raise ValueError("PyramidNet widths must not decrease")
        self.stride = stride
        self.pad_channels = self.out_ch - in_ch
        self.shake_drop = ShakeDrop(survival) if survival is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        if self.shake_drop is not None:
            out = self.shake_drop(out)
        shortcut = x
        if self.stride != 1:
            shortcut = F.avg_pool2d(shortcut, 2, self.stride, ceil_mode=True)
        if self.pad_channels:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad_channels))
        return out + shortcut


class PyramidNet(nn.Module):
    """Additive PyramidNet-``depth`` with widening factor ``alpha``."""

    def __init__(
        self,
        depth: int = 110,
        alpha: float = 270,
        num_classes: int = 10,
        in_channels: int = 3,
        bottleneck: bool = False,
        shakedrop: bool = False,
        p_last: float = 0.5,
    ):
        super().__init__()
        per_unit = 9 if bottleneck else 6
        if depth < 2 + per_unit or (depth - 2) % per_unit:
            kind = "9n + 2 (bottleneck)" if bottleneck else "6n + 2 (basic)"
            raise ValueError(f"PyramidNet depth must be {kind} with n >= 1, got {depth}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        n = (depth - 2) // per_unit
        total = 3 * n
        self.depth, self.alpha, self.bottleneck = depth, alpha, bottleneck
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        )
        units: list[nn.Module] = []
        in_ch = 16
        for k in range(1, total + 1):
            stride = 2 if k in (n + 1, 2 * n + 1) else 1
            width = int(math.floor(16 + alpha * k / total))
            survival = 1.0 - (k / total) * (1.0 - p_last) if shakedrop else None
            unit = _PyramidUnit(in_ch, width, stride, bottleneck, survival)
            units.append(unit)
            in_ch = unit.out_ch
        self.units = nn.Sequential(*units)
        self.bn = nn.BatchNorm2d(in_ch)
        self.fc = nn.Linear(in_ch, num_classes)
        init_residual_network(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.units(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _pyramidnet(num_classes: int, in_channels: int, defaults: dict, kw: dict) -> PyramidNet:
    return PyramidNet(num_classes=num_classes, in_channels=in_channels, **{**defaults, **kw})


@register_model
def Pyramid_ShakeDrop(num_classes: int = 10, in_channels: int = 3, **kw) -> PyramidNet:  # noqa: N802
    """PyramidNet-272 (alpha 200, bottleneck) with ShakeDrop, the seed system's model."""
    defaults = {"depth": 272, "alpha": 200, "bottleneck": True, "shakedrop": True}
    return _pyramidnet(num_classes, in_channels, defaults, kw)


@register_model
def pyramidnet_110_270(num_classes: int = 10, in_channels: int = 3, **kw) -> PyramidNet:
    """PyramidNet-110 (alpha 270, basic units), no ShakeDrop (as in ESAM)."""
    defaults = {"depth": 110, "alpha": 270, "bottleneck": False, "shakedrop": False}
    return _pyramidnet(num_classes, in_channels, defaults, kw)


@register_model
def pyramidnet_110_270_shakedrop(num_classes: int = 10, in_channels: int = 3, **kw) -> PyramidNet:
    """PyramidNet-110 (alpha 270, basic units) with ShakeDrop."""
    defaults = {"depth": 110, "alpha": 270, "bottleneck": False, "shakedrop": True}
    return _pyramidnet(num_classes, in_channels, defaults, kw)
