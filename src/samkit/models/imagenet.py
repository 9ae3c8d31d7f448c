"""ImageNet-scale models from torchvision, under the seed system's names.

``Resnet50``, ``Resnet101``, ``Resnet152`` and ``efficientnet-b0`` ... ``efficientnet-b7`` wrap
the torchvision architectures (never downloading weights: ``weights=None`` always; use
:func:`samkit.models.finetune.load_pretrained` with a local file to start from a checkpoint).
``num_classes`` sets the classifier's size; ``in_channels != 3`` replaces the stem convolution
by a freshly initialised one with the same geometry. Other keywords reach the torchvision
builder (e.g. ``zero_init_residual=True`` for ResNets, ``stochastic_depth_prob`` or ``dropout``
for EfficientNets). The seed's ``efficientnet-l2`` has no torchvision counterpart and is not
provided. EfficientNets are built at torchvision's default BatchNorm settings (momentum 0.01,
eps 1e-3, matching TensorFlow's decay 0.99); train at the resolutions of their papers
(224 for B0 ... 600 for B7), though any input of at least 32x32 works. torchvision is imported
when one of these models is built, not when this module is imported (it costs ~1.5 s).
"""

from __future__ import annotations

import torch.nn as nn

from samkit.models.registry import register_model

__all__ = ["replace_stem"]


def _new_conv_like(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.groups != 1:
        raise ValueError("cannot replace a grouped stem convolution")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def replace_stem(model: nn.Module, in_channels: int) -> nn.Module:
    """Give a torchvision ResNet or EfficientNet a new stem convolution for ``in_channels``."""
    from torchvision import models as tvm  # lazy: ~1.5 s to import, only these models need it

    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if isinstance(model, tvm.ResNet):
        if model.conv1.in_channels != in_channels:
            model.conv1 = _new_conv_like(model.conv1, in_channels)
    elif isinstance(model, tvm.EfficientNet):
        stem = model.features[0][0]
        if stem.in_channels != in_channels:
            model.features[0][0] = _new_conv_like(stem, in_channels)
    else:
        raise TypeError(f"don't know the stem of a {type(model).__name__}")
    return model


def _build(builder_name: str, num_classes: int, in_channels: int, kw: dict) -> nn.Module:
    from torchvision import models as tvm  # lazy: ~1.5 s to import, only these models need it

    if "weights" in kw and kw["weights"] is not None:
        raise ValueError(
            "samkit never downloads weights; build with weights=None and use "
            "samkit.models.finetune.load_pretrained(model, local_path)"
        )
    kw = {k: v for k, v in kw.items() if k != "weights"}
    model = getattr(tvm, builder_name)(weights=None, num_classes=num_classes, **kw)
    return replace_stem(model, in_channels)


def _register(name: str, builder_name: str, doc: str) -> None:
    def build(num_classes: int = 1000, in_channels: int = 3, **kw) -> nn.Module:
        return _build(builder_name, num_classes, in_channels, kw)

    build.__name__ = build.__qualname__ = name.replace("-", "_")
    build.__doc__ = doc + " (torchvision, random initialisation)."
    register_model(name)(build)


_register("Resnet50", "resnet50", "ResNet-50 (25.6M parameters at 1000 classes)")
_register("Resnet101", "resnet101", "ResNet-101 (44.5M parameters at 1000 classes)")
_register("Resnet152", "resnet152", "ResNet-152 (60.2M parameters at 1000 classes)")
for _i in range(8):
    _register(
        f"efficientnet-b{_i}",
        f"efficientnet_b{_i}",
        f"EfficientNet-B{_i}",
    )
del _i
