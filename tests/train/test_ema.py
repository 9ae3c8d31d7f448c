"""The EMA of the weights (``--ema-decay``) against its closed form, written here from the formula
``ema_t = d * ema_{t-1} + (1 - d) * w_t`` (``ema_0 = w_0``), so ``ema_T = d^T w_0 +
sum_t (1 - d) d^(T - t) w_t``: floating-point tensors (weights, BatchNorm running statistics) are
averaged, integer buffers (``num_batches_tracked``) copied. The same values through the training
loop are checked in test_loop_values.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from samkit.train.ema import EMA

DECAY = 0.75


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def set_state(net: nn.Module, t: int) -> dict[str, torch.Tensor]:
    """Give every tensor of ``net`` a known value for step ``t``; returns a float64 copy."""
    with torch.no_grad():
        for i, tensor in enumerate(net.state_dict().values()):
            if tensor.is_floating_point():
                # values that change with t in a different way per tensor (0 at no step)
                ramp = torch.arange(tensor.numel(), dtype=torch.float64).view(tensor.shape)
                tensor.copy_(((i + 1) * 0.5 * t + 0.25 * ramp * (t % 3)).to(tensor.dtype))
            else:
                tensor.fill_(10 * t + 3)
    return {k: v.detach().to(torch.float64).clone() for k, v in net.state_dict().items()}


def closed_form(history: list[dict[str, torch.Tensor]], d: float) -> dict[str, torch.Tensor]:
    """``d^T w_0 + sum_{t=1..T} (1 - d) d^(T-t) w_t`` per float tensor; integer ones: ``w_T``."""
    T = len(history) - 1
    out = {}
    for key, last in history[-1].items():
        if key.endswith("num_batches_tracked"):
            out[key] = last
            continue
        value = d**T * history[0][key]
        for t in range(1, T + 1):
            value = value + (1 - d) * d ** (T - t) * history[t][key]
        out[key] = value
    return out


def test_ema_equals_the_closed_form_after_each_update():
    net = model()
    history = [set_state(net, 0)]
    ema = EMA(net, DECAY)
    for t in range(1, 8):
        history.append(set_state(net, t))
        ema.update(net)
        want = closed_form(history, DECAY)
        got = ema.state_dict()
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == net.state_dict()[key].dtype, key
            torch.testing.assert_close(got[key].double(), want[key], rtol=1e-6, atol=1e-6)


def test_constant_weights_stay_then_one_change_moves_the_ema_by_one_minus_decay():
    # The smallest case by hand: w = 2 at steps 0..3 (EMA stays 2), then w = 6 at step 4:
    # ema = 0.75 * 2 + 0.25 * 6 = 3; then w = 6 again: 0.75 * 3 + 0.25 * 6 = 3.75.
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(2.0)
    ema = EMA(net, DECAY)
    for _ in range(3):
        ema.update(net)
        assert ema.state_dict()["weight"].item() == 2.0
    with torch.no_grad():
        net.weight.fill_(6.0)
    ema.update(net)
    assert ema.state_dict()["weight"].item() == pytest.approx(3.0, abs=1e-6)
    ema.update(net)
    assert ema.state_dict()["weight"].item() == pytest.approx(3.75, abs=1e-6)


def test_integer_buffers_are_copied_not_averaged():
    net = model()
    ema = EMA(net, DECAY)
    net.train()
    for _ in range(5):
        net(torch.randn(4, 3))  # BatchNorm counts batches and moves its running statistics
        ema.update(net)
    bn = net[1]
    assert ema.state_dict()["1.num_batches_tracked"].item() == bn.num_batches_tracked.item() == 5
    assert ema.state_dict()["1.num_batches_tracked"].dtype == torch.int64
    # the running mean is averaged: not equal to the current one
    assert not torch.equal(ema.state_dict()["1.running_mean"], bn.running_mean)


def test_the_shadow_is_a_copy_and_a_state_dict_round_trip_restores_it():
    net = model()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    ema = EMA(net, DECAY)
    with torch.no_grad():
        net[0].weight.add_(1.0)  # the model moves, the shadow not (until an update)
    assert torch.equal(ema.state_dict()["0.weight"], start["0.weight"])
    history = [set_state(net, 0)]
    ema = EMA(net, DECAY)
    for t in range(1, 4):
        history.append(set_state(net, t))
        ema.update(net)
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    other = EMA(model(), DECAY)
    other.load_state_dict(saved)
    for key, value in saved.items():
        assert torch.equal(other.state_dict()[key], value), key
    # and the loaded EMA continues the same recurrence
    history.append(set_state(net, 4))
    other.update(net)
    want = closed_form(history, DECAY)
    for key in want:
        torch.testing.assert_close(
            other.state_dict()[key].double(), want[key], rtol=1e-6, atol=1e-6
        )


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_decay_outside_the_open_interval_is_refused(decay):
    with pytest.raises(ValueError, match="EMA decay must be in"):
        EMA(model(), decay)
