"""The model registry and the built-in small models."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from samkit.models import (
    SmallResNet,
    create_model,
    is_model,
    list_model_families,
    list_models,
    register_model,
    register_model_family,
    registry,
)


@pytest.fixture
def clean_registry(monkeypatch):
    """Register test models into a copy of the registry, discarded after the test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))


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


def test_wide_resnet_family_is_registered():
    assert "wrn_{depth}_{k}" in list_model_families()
    assert is_model("wrn_22_2") and is_model("wrn_10_1")
    assert not is_model("wrn_27_10") and not is_model("wrn_28_0") and not is_model("wrn_28_10x")
    assert "wrn_22_2" not in list_models()  # family members are not listed
    with pytest.raises(ValueError, match="6n \\+ 4"):  # the builder's own message
        create_model("wrn_27_10")


def test_register_model_family(clean_registry):
    calls = []

    def build(name, num_classes=10, in_channels=3, **kw):
        calls.append((name, num_classes, in_channels, kw))
        if name.endswith("_0"):
            raise ValueError(f"{name!r}: width must be >= 1")
        return nn.Linear(int(name.rsplit("_", 1)[1]), num_classes)

    register_model_family(r"lin_(\d+)", build, display="lin_{width}")
    register_model_family(r"lin_(\d+)", build, display="lin_{width}")  # again: harmless
    assert "lin_{width}" in list_model_families()
    model = create_model("lin_4", num_classes=3, in_channels=1, bias=False)
    assert (model.in_features, model.out_features) == (4, 3)
    assert calls == [("lin_4", 3, 1, {"bias": False})]
    assert is_model("lin_7") and not is_model("lin_") and not is_model("xlin_7")
    assert len(calls) == 1  # is_model builds nothing
    with pytest.raises(ValueError, match="width must be >= 1"):
        create_model("lin_0")
    with pytest.raises(ValueError, match="unknown model 'lin_x'"):
        create_model("lin_x")
    with pytest.raises(ValueError, match="already registered"):
        register_model_family(r"lin_(\d+)", lambda name, **kw: nn.Identity())


def test_family_check_decides_is_model(clean_registry):
    def check(name):
        if name == "odd_0":
            raise ValueError("no such member")

    register_model_family("odd_[0-9]", lambda name, **kw: nn.Identity(), check=check)
    assert list_model_families().count("odd_[0-9]") == 1  # display defaults to the pattern
    assert is_model("odd_1") and not is_model("odd_0")


def test_registered_names_take_precedence_over_families(clean_registry):
    register_model_family("fam_.*", lambda name, **kw: nn.Identity())

    @register_model
    def fam_special(num_classes=10, in_channels=3):
        return nn.Linear(2, num_classes)

    assert isinstance(create_model("fam_special"), nn.Linear)
    assert isinstance(create_model("fam_other"), nn.Identity)


def test_registry_imports_no_architecture():
    tree = ast.parse(Path(registry.__file__).read_text())
    imported = [
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    ]
    assert not [m for m in imported if m and m.startswith("samkit")], imported
