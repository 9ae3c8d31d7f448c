"""The model registry and the built-in small models."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from samkit.models import SmallResNet, create_model, is_model, list_models, register_model, registry


@pytest.fixture
def clean_registry(monkeypatch):
    """Register test models into a copy of the registry, discarded after the test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


SMALL_MODELS = ("resnet_small", "resnet_tiny")  # the models of samkit.models.small


def test_builtin_models_are_listed():
    names = list_models()
    assert set(SMALL_MODELS) <= set(names)
    assert names == sorted(names)
    assert is_model("resnet_small") and not is_model("nope")
    assert list_models("resnet_*") == [n for n in names if n.startswith("resnet_")]


@pytest.mark.parametrize("in_channels,num_classes", [(1, 10), (3, 7)])
def test_small_models_build_and_run(in_channels, num_classes):
    for name in SMALL_MODELS:
        model = create_model(name, num_classes=num_classes, in_channels=in_channels)
        model.eval()
        for size in (28, 32):
            out = model(torch.randn(2, in_channels, size, size))
            assert out.shape == (2, num_classes), name


def test_default_model_is_small_and_seeded():
    torch.manual_seed(0)
    a = create_model("resnet_small", in_channels=1)
    torch.manual_seed(0)
    b = create_model("resnet_small", in_channels=1)
    assert sum(p.numel() for p in a.parameters()) < 1_000_000
    assert any(isinstance(m, nn.BatchNorm2d) for m in a.modules())
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'resnet_huge'") as info:
        create_model("resnet_huge")
    for name in list_models():
        assert name in str(info.value)


def test_register_plain_and_named(clean_registry):
    @register_model
    def tiny_net(num_classes=10, in_channels=3, hidden=4):
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.Linear(hidden, num_classes))

    @register_model("tiny_named")
    def _builder(num_classes=10, in_channels=3):
        return SmallResNet(num_classes, in_channels, widths=(4,), depths=(1,))

    assert {"tiny_net", "tiny_named"} <= set(list_models())
    assert list_models("tiny_*") == ["tiny_named", "tiny_net"]
    model = create_model("tiny_net", num_classes=3, hidden=5)
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 3)
    assert model[1].out_features == 5  # extra keyword arguments reach the builder
    assert create_model("tiny_named", num_classes=2, in_channels=1)(
        torch.randn(1, 1, 8, 8)
    ).shape == (
        1,
        2,
    )


def test_duplicate_name_is_an_error(clean_registry):
    def a(num_classes=10, in_channels=3):
        return nn.Identity()

    def b(num_classes=10, in_channels=3):
        return nn.Identity()

    register_model("dup")(a)
    register_model("dup")(a)  # the same function again is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_model("dup")(b)


def test_small_resnet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="widths and depths"):
        SmallResNet(widths=(8, 16), depths=(1,))
