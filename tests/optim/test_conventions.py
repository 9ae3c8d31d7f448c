"""How frameworks call an optimizer: step() without a closure after first_step() (GradScaler,
Accelerate, the HF Trainer) and LR schedulers that read momentum / betas from ``defaults``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from samkit.optim import ESAM, SAM


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(5, 3).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    return model, x, y


def two_calls(opt, model, x, y, finish):
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    nn.functional.cross_entropy(model(x), y).backward()
    finish(opt)


@pytest.mark.parametrize("cls", [SAM, ESAM])
def test_step_without_closure_after_first_step_is_the_second_step(cls):
    model, x, y = setup()
    kw = {"beta": 1.0, "gamma": 1.0} if cls is ESAM else {}
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = cls(a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kw)
    opt_b = cls(b.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kw)
    for _ in range(2):
        two_calls(opt_a, a, x, y, lambda o: o.second_step(zero_grad=True))
        two_calls(opt_b, b, x, y, lambda o: (o.step(), o.zero_grad()))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # With nothing perturbed, step() without a closure is still the clear error.
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt_b.step()


def test_grad_scaler_calls_step_without_a_closure():
    model, x, y = setup(1)
    reference = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    ref_opt = SAM(reference.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)  # the first pass's gradients, unscaled before the perturbation
    opt.first_step(zero_grad=True)
    scaler.update()  # one unscale_ per update: a new one for the second pass
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)  # GradScaler.step -> opt.step() with no closure
    scaler.update()
    two_calls(ref_opt, reference, x, y, lambda o: o.second_step())
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_lr_schedulers_that_cycle_momentum_work_on_sam():
    # The same schedule as on a plain SGD optimizer, applied to the base optimizer's groups.
    model, _, _ = setup()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    plain = torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.1, momentum=0.9)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["rho"] == 0.05
    schedules = [
        torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=10) for o in (opt, plain)
    ]
    for _ in range(5):
        for o, sched in zip((opt, plain), schedules):
            o._opt_called = True  # (no warning about calling scheduler.step() first)
            sched.step()
        mine, theirs = opt.base_optimizer.param_groups[0], plain.param_groups[0]
        assert (mine["lr"], mine["momentum"]) == (theirs["lr"], theirs["momentum"])
    adam = SAM(model.parameters(), torch.optim.AdamW, lr=1e-3)
    torch.optim.lr_scheduler.CyclicLR(adam, base_lr=1e-4, max_lr=1e-3, cycle_momentum=True)
    assert adam.base_optimizer.param_groups[0]["betas"][0] == pytest.approx(0.9)
