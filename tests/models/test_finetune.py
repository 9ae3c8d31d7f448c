"""Fine-tuning: loading local pretrained checkpoints with a new head, and frozen BatchNorm."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch
import torch.nn as nn

from samkit.models import cifar_resnet, imagenet, shake_shake  # noqa: F401  (registration)
from samkit.models.finetune import (
    find_head,
    freeze_batchnorm_statistics,
    is_batchnorm_frozen,
    load_pretrained,
    unfreeze_batchnorm_statistics,
)
from samkit.models.registry import create_model

HEAD = ["fc.weight", "fc.bias"]


def tiny(num_classes: int = 10, **kw) -> nn.Module:
    return create_model("resnet32", num_classes=num_classes, **{"width_mult": 0.25, **kw})


def trained_tiny(num_classes: int = 10) -> nn.Module:
    """A tiny model whose weights and BN buffers differ from a fresh initialisation."""
    torch.manual_seed(1)
    model = tiny(num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.train()(torch.randn(4, 3, 32, 32))  # moves the running statistics
    return model


def assert_backbone_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if k not in HEAD:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("wrap", ["bare", "model_key", "ddp_prefix"])
def test_new_head_when_class_count_differs(tmp_path, wrap, caplog):
    source = trained_tiny(10)
    state = source.state_dict()
    if wrap == "model_key":
        state = {"model": state, "epoch": 3}
    elif wrap == "ddp_prefix":
        state = {"module." + k: v for k, v in state.items()}
    path = tmp_path / "pretrained.pt"
    torch.save(state, path)

    torch.manual_seed(2)
    target = tiny(num_classes=5)
    fresh_head = {k: v.clone() for k, v in target.state_dict().items() if k in HEAD}
    with caplog.at_level(logging.INFO, logger="samkit.models.finetune"):
        report = load_pretrained(target, path)

    assert report.dropped == HEAD and report.new_head
    assert not (report.missing or report.unexpected or report.mismatched)
    assert set(report.loaded) == set(source.state_dict()) - set(HEAD)
    assert_backbone_equal(source, target)
    for k, v in target.state_dict().items():
        if k in HEAD:
            assert torch.equal(v, fresh_head[k])  # the model's own fresh head is kept
    assert target.fc.out_features == 5
    assert "fc.weight" in caplog.text and "pretrained.pt" in caplog.text
    assert target.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_same_class_count_loads_everything(tmp_path):
    source = trained_tiny(10)
    path = tmp_path / "same.pt"
    torch.save(source.state_dict(), path)
    target = tiny(10)
    report = load_pretrained(target, str(path))  # str paths work too
    assert report.dropped == [] and not report.new_head
    for k, v in source.state_dict().items():
        assert torch.equal(v, target.state_dict()[k]), k


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "half.pt"
    torch.save(trained_tiny().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated") as info:
        load_pretrained(tiny(), path)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is not None  # the underlying error is chained


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="corrupt or truncated") as info:
        load_pretrained(tiny(), path)
    assert str(path) in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    path = tmp_path / "nowhere" / "ckpt.pt"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_pretrained(tiny(), path)
    assert str(path) in str(info.value)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="neither a state_dict"):
        load_pretrained(tiny(), path)


class _Opaque:
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"model": tiny().state_dict(), "extra": _Opaque()}, path)
    with pytest.raises(ValueError, match="weights_only") as info:
        load_pretrained(tiny(), path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)


def test_backbone_mismatch_is_an_error(tmp_path):
    path = tmp_path / "wider.pt"
    torch.save(tiny(width_mult=0.5).state_dict(), path)
    target = tiny()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="shape mismatches outside the head") as info:
        load_pretrained(target, path)
    message = str(info.value)
    assert str(path) in message and "stem.0.weight" in message and "more)" in message
    for k, v in target.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k])

    report = load_pretrained(target, path, strict_backbone=False)
    assert "stem.0.weight" in report.mismatched
    assert report.dropped == ["fc.weight"]  # the bias still has 10 entries: it was loaded


def test_missing_and_unexpected_keys(tmp_path):
    state = trained_tiny().state_dict()
    del state["blocks.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing from the checkpoint") as info:
        load_pretrained(tiny(), path)
    assert "blocks.0.conv1.weight" in str(info.value) and "extra.weight" in str(info.value)
    report = load_pretrained(tiny(), path, strict_backbone=False)
    assert report.missing == ["blocks.0.conv1.weight"] and report.unexpected == ["extra.weight"]


def test_missing_num_batches_tracked_is_fine(tmp_path):
    state = {k: v for k, v in trained_tiny().state_dict().items() if "num_batches" not in k}
    path = tmp_path / "old.pt"
    torch.save(state, path)
    assert not load_pretrained(tiny(), path).missing


def test_find_head():
    assert find_head(tiny()) == "fc"
    assert find_head(create_model("shake_shake_26_2x96d", depth=8, width=4)) == "fc"
    assert find_head(create_model("Resnet50", num_classes=3)) == "fc"
    assert find_head(create_model("efficientnet-b0", num_classes=3)) == "classifier.1"
    with pytest.raises(ValueError, match="no nn.Linear"):
        find_head(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_explicit_head(tmp_path):
    source = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 3))
    path = tmp_path / "seq.pt"
    torch.save(source.state_dict(), path)
    target = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5), nn.Linear(5, 5))
    with pytest.raises(ValueError, match="outside the head"):
        load_pretrained(target, path)  # the default head is the last Linear only
    report = load_pretrained(target, path, head="2", strict_backbone=False)
    assert report.dropped == ["2.weight", "2.bias"] and report.mismatched == ["3.weight", "3.bias"]
    assert torch.equal(target[0].weight, source[0].weight)


# -- frozen BatchNorm -----------------------------------------------------------------------------


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}


def test_freeze_batchnorm_statistics_survives_train():
    model = trained_tiny()
    x = torch.randn(8, 3, 32, 32)
    count = freeze_batchnorm_statistics(model)
    assert count == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0
    assert freeze_batchnorm_statistics(model) == count  # idempotent: no second hook
    assert all(len(m._forward_pre_hooks) == 1 for m in model.modules() if is_batchnorm_frozen(m))

    buffers = _bn_buffers(model)
    model.train()
    out_train = model(x)
    for k, v in _bn_buffers(model).items():
        assert torch.equal(v, buffers[k]), k  # running_mean/var, num_batches_tracked unchanged
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.training  # the rest of the model is still in training mode
    # Normalisation used the running statistics: same output as in evaluation mode.
    torch.testing.assert_close(out_train, model.eval()(x))
    # The affine parameters still learn.
    model.train()
    model(x).sum().backward()
    assert model.blocks[0].bn1.weight.grad is not None


def test_frozen_batchnorm_survives_deepcopy_and_pickle(tmp_path):
    model = trained_tiny()
    freeze_batchnorm_statistics(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        buffers = _bn_buffers(clone)
        clone.train()(torch.randn(4, 3, 32, 32))
        for k, v in _bn_buffers(clone).items():
            assert torch.equal(v, buffers[k]), k


def test_unfreeze_batchnorm_statistics():
    model = trained_tiny()
    freeze_batchnorm_statistics(model)
    model.train()
    assert unfreeze_batchnorm_statistics(model) > 0
    assert not any(is_batchnorm_frozen(m) for m in model.modules())
    buffers = _bn_buffers(model)
    model(torch.randn(4, 3, 32, 32))
    assert not torch.equal(model.stem[1].running_mean, buffers["stem.1.running_mean"])
