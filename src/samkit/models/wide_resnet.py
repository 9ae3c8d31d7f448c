"""Wide residual networks (Zagoruyko & Komodakis, BMVC 2016), pre-activation, for 32x32 images.

WRN-d-k: a 3x3 stem convolution with 16 channels, then three groups of ``n = (d - 4) / 6``
pre-activation blocks with ``16k``, ``32k`` and ``64k`` channels at strides 1, 2 and 2, then
BN-ReLU, global average pooling and a linear classifier. A block is::

    BN-ReLU -> conv3x3(stride) -> BN-ReLU -> [dropout] -> conv3x3   (+ shortcut)

The shortcut is the identity, or a 1x1 convolution (with the block's stride) when the shape
changes; the 1x1 convolution then reads the block's pre-activated input, as in the paper. Depth
follows the paper's convention ``d = 6n + 4`` (WRN-28: n = 4). WRN-28-10 has ~36.5M parameters.

Registered names: ``WideResnet28x10`` (the seed system's name), ``wrn_16_8`` (davda54/sam's
CIFAR model) and ``wrn_28_10``; all take ``drop_rate``. Any other ``wrn_{d}_{k}`` name is
understood by :func:`parse_wrn_name` / :func:`wrn_from_name`, registered as the model family
``wrn_{depth}_{k}`` (see :func:`samkit.models.registry.register_model_family`).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from samkit.models.registry import register_model, register_model_family

__all__ = ["WideBasicBlock", "WideResNet", "parse_wrn_name", "wide_resnet", "wrn_from_name"]

_WRN_NAME = re.compile(r"wrn_(\d+)_(\d+)")
MAX_DEPTH, MAX_WIDTH = 1000, 1000


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus a shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.drop_rate = float(drop_rate)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv1(act)
        out = F.relu(self.bn2(out))
        if self.drop_rate > 0.0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # With a projection the shortcut shares the block's pre-activation (as in the paper).
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``; ``depth`` must be ``6n + 4``."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.depth, self.widen_factor = depth, widen_factor
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        in_ch = 16
        for width, stride in zip(widths, (1, 2, 2)):
            for j in range(n):
                blocks.append(WideBasicBlock(in_ch, width, stride if j == 0 else 1, drop_rate))
                in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_ch)
        self.fc = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convolutions, unit/zero BatchNorm, zero linear bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def wide_resnet(
    depth: int, widen_factor: int, num_classes: int = 10, in_channels: int = 3, **kw
) -> WideResNet:
    return WideResNet(depth, widen_factor, num_classes=num_classes, in_channels=in_channels, **kw)


def parse_wrn_name(name: str) -> tuple[int, int] | None:
    """``"wrn_28_10"`` -> ``(28, 10)``; None when ``name`` is not of the form ``wrn_{d}_{k}``.

    A well-formed name with an impossible depth (not ``6n + 4``) raises ``ValueError``.
    """
    m = _WRN_NAME.fullmatch(name)
    if m is None:
        return None
    depth, k = int(m.group(1)), int(m.group(2))
    # The bounds keep even a meta-device build (to count the parameters) within a second or two.
    if not 10 <= depth <= MAX_DEPTH or (depth - 4) % 6 or not 1 <= k <= MAX_WIDTH:
        raise ValueError(
            f"{name!r}: a WideResNet needs depth 6n + 4 (10, 16, 22, 28, 40, ..., at most "
            f"{MAX_DEPTH}) and width in [1, {MAX_WIDTH}]"
        )
    return depth, k


def wrn_from_name(name: str, num_classes: int = 10, in_channels: int = 3, **kw) -> WideResNet:
    """Build the WRN named ``wrn_{d}_{k}`` (``ValueError`` for any other name)."""
    parsed = parse_wrn_name(name)
    if parsed is None:
        raise ValueError(f"{name!r} is not a WideResNet name of the form 'wrn_{{depth}}_{{k}}'")
    return wide_resnet(*parsed, num_classes=num_classes, in_channels=in_channels, **kw)


@register_model
def WideResnet28x10(num_classes: int = 10, in_channels: int = 3, **kw) -> WideResNet:  # noqa: N802
    """WRN-28-10 (~36.5M parameters), the seed system's default model."""
    return wide_resnet(28, 10, num_classes, in_channels, **kw)


def _register_wrn(depth: int, k: int) -> None:
    def build(num_classes: int = 10, in_channels: int = 3, **kw) -> WideResNet:
        return wide_resnet(depth, k, num_classes, in_channels, **kw)

    build.__name__ = build.__qualname__ = f"wrn_{depth}_{k}"
    build.__doc__ = f"WRN-{depth}-{k} (pre-activation WideResNet for 32x32 images)."
    register_model(build)


for _d, _k in ((16, 8), (28, 10)):
    _register_wrn(_d, _k)
del _d, _k

register_model_family(_WRN_NAME, wrn_from_name, display="wrn_{depth}_{k}", check=parse_wrn_name)
