"""The learning-rate schedule against its documented formula, written here: step ``s`` of ``T``
(0-based, the steps taken before it) runs at ``lr0 * (1 + cos(pi * s / T)) / 2``: lr0 at the first
step, lr0 / 2 half-way, 0 after the last. Read where the optimizer reads it: its param groups (and,
for SAM, its base optimizer's). The same values through the training loop are checked in
test_loop_values.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from samkit.optim import SAM
from samkit.train.schedule import CosineSchedule, cosine_lr

LR0 = 0.4


def expected(s: int, total: int) -> float:
    return LR0 * (1 + math.cos(math.pi * min(s, total) / total)) / 2


@pytest.mark.parametrize("total", [1, 7, 100])
def test_cosine_lr_values(total):
    assert cosine_lr(0, total, LR0) == LR0
    assert cosine_lr(total, total, LR0) == pytest.approx(0.0, abs=1e-15)
    for s in range(total + 3):
        assert cosine_lr(s, total, LR0) == pytest.approx(expected(s, total), rel=1e-12, abs=1e-15)


def test_landmarks_by_hand():
    # cos(0) = 1, cos(pi/2) = 0, cos(pi/4) = 1/sqrt(2), cos(3pi/4) = -1/sqrt(2), cos(pi) = -1
    assert cosine_lr(0, 8, 1.0) == 1.0
    assert cosine_lr(2, 8, 1.0) == pytest.approx((1 + 2**-0.5) / 2, rel=1e-12)
    assert cosine_lr(4, 8, 1.0) == pytest.approx(0.5, rel=1e-12)
    assert cosine_lr(6, 8, 1.0) == pytest.approx((1 - 2**-0.5) / 2, rel=1e-12)
    assert cosine_lr(8, 8, 1.0) == pytest.approx(0.0, abs=1e-15)
    assert cosine_lr(9, 8, 1.0) == pytest.approx(0.0, abs=1e-15)  # stays at 0 past the end
    # decreasing: the learning rate never rises
    values = [cosine_lr(s, 50, 1.0) for s in range(51)]
    assert all(a > b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("wrap", ["sgd", "sam"])
def test_apply_sets_every_param_group_as_the_loop_uses_it(wrap):
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    groups = [{"params": net[0].parameters()}, {"params": net[1].parameters(), "lr": 9.0}]
    if wrap == "sam":
        opt = SAM(groups, torch.optim.SGD, rho=0.05, lr=LR0, momentum=0.9)
    else:
        opt = torch.optim.SGD(groups, lr=LR0, momentum=0.9)
    total = 10
    schedule = CosineSchedule(opt, LR0, total)
    seen = []
    for s in range(total + 2):  # as the loop: apply before the step, count it after
        lr = schedule.apply()
        assert lr == pytest.approx(expected(s, total), rel=1e-12, abs=1e-15)
        all_groups = list(opt.param_groups)
        if wrap == "sam":
            all_groups += opt.base_optimizer.param_groups
        for group in all_groups:
            assert group["lr"] == lr
        seen.append(opt.param_groups[0]["lr"])
        schedule.step()
        assert schedule.lr() == pytest.approx(expected(s + 1, total), rel=1e-12, abs=1e-15)
    assert seen[0] == LR0 and seen[5] == pytest.approx(LR0 / 2, rel=1e-12)


def test_state_dict_round_trip_continues_the_schedule():
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=LR0)
    schedule = CosineSchedule(opt, LR0, 20)
    for _ in range(7):
        schedule.apply()
        schedule.step()
    state = schedule.state_dict()
    assert state == {"steps_done": 7, "base_lr": LR0, "total_steps": 20, "warmup_steps": 0}
    fresh = CosineSchedule(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=LR0), LR0, 20)
    fresh.load_state_dict(state)
    assert fresh.apply() == pytest.approx(expected(7, 20), rel=1e-12)
