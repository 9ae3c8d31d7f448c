"""A skipped step changes nothing (issue 15, item 3): one non-finite input gives ``took_step``
False and leaves the weights, the optimizer state and the BatchNorm running statistics exactly as
they were, so the eval-mode model still answers finitely on clean data."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samkit.optim import create_optimizer
from samkit.train.step import SharpnessAwareStep


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8),
        nn.BatchNorm1d(8),
        nn.Linear(8, 3),
    )


def _loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, state in enumerate(optimizer.state.values()):
        for key, value in state.items():
            if torch.is_tensor(value):
                out[f"optimizer.{i}.{key}"] = value.clone()
    for key, values in optimizer.state_dict().get("samkit", {}).items():  # e.g. F-SAM's average
        if key.endswith("generator"):  # an RNG (ESAM's masks) moves on, like dropout's: it drew
            continue
        for i, value in enumerate(values if isinstance(values, list) else [values]):
            if torch.is_tensor(value):
                out[f"samkit.{key}.{i}"] = value.clone()
    return out


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("sgd", {}),
        ("sam", {"rho": 0.05}),
        ("sam", {"rho": 0.05, "adaptive": True}),
        ("esam", {"rho": 0.05, "beta": 0.5, "gamma": 0.5}),
        ("gsam", {"rho": 0.05}),
        ("fsam", {"rho": 0.05}),
    ],
)
@pytest.mark.parametrize("bn_stats", ["first", "both"])
def test_a_skipped_step_leaves_weights_optimizer_and_batchnorm_unchanged(name, kwargs, bn_stats):
    model = _model()
    optimizer = create_optimizer(
        name, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs
    )
    step = SharpnessAwareStep(model, optimizer, _loss, bn_stats=bn_stats)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    assert step(x, y).took_step  # momentum buffers and statistics exist and are non-trivial
    before = _snapshot(model, optimizer)

    poisoned = x.clone()
    poisoned[0, 0, 0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert step(poisoned, y).took_step is False

    after = _snapshot(model, optimizer)
    if name == "fsam":
        assert any(k.startswith("samkit.friendly_momentum") for k in before)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"a skipped step changed {changed}"
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    # and training goes on from there
    model.train()
    assert step(x, y).took_step


def test_a_skipped_step_under_m_sharpness_restores_the_statistics_of_every_chunk():
    model = _model()
    optimizer = create_optimizer("sam", model.parameters(), torch.optim.SGD, lr=0.1, rho=0.05)
    step = SharpnessAwareStep(model, optimizer, _loss, m=4)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    step(x, y)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    poisoned = x.clone()
    poisoned[7, 0, 3, 3] = float("nan")  # in the second chunk: the first chunk's pass was fine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert step(poisoned, y).took_step is False
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_taken_step_still_updates_the_statistics():
    """The restore is for skipped steps only (else the test above could pass by never updating)."""
    model = _model()
    optimizer = create_optimizer("sam", model.parameters(), torch.optim.SGD, lr=0.1, rho=0.05)
    step = SharpnessAwareStep(model, optimizer, _loss)
    bn = model[1]
    mean, count = bn.running_mean.clone(), int(bn.num_batches_tracked)
    assert step(torch.randn(8, 1, 8, 8) + 3.0, torch.randint(0, 3, (8,))).took_step
    assert int(bn.num_batches_tracked) == count + 1
    assert not torch.equal(bn.running_mean, mean)


@pytest.mark.parametrize("shapes", [((0, 1, 8, 8), (0,)), ((4, 1, 8, 8), (3,))])
def test_an_empty_or_mismatched_batch_is_refused_with_a_clear_error(shapes):
    model = _model()
    optimizer = create_optimizer("sam", model.parameters(), torch.optim.SGD, lr=0.1, rho=0.05)
    step = SharpnessAwareStep(model, optimizer, _loss)
    x_shape, y_shape = shapes
    with pytest.raises(ValueError, match="non-empty batch with one target per input"):
        step(torch.randn(x_shape), torch.zeros(y_shape, dtype=torch.long))
