"""Momentum-SAM against a reference written here from the paper's Algorithm 1 (float64, SGD with
momentum, PyTorch's convention v <- mu v + g): the perturbation, its exact restore, the update,
the forms it is called in, resume and refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from samkit.optim.momentum_sam import MomentumSAM

LR, MU, RHO = 0.1, 0.9, 0.2


def problem(seed: int = 0, steps: int = 5):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    batches = [
        (
            torch.randn(16, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (16,), generator=g),
        )
        for _ in range(steps)
    ]
    return model, batches


def grad_at(model, w, x, y):
    w = [t.detach().requires_grad_(True) for t in w]
    params = dict(zip([n for n, _ in model.named_parameters()], w))
    loss = nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    return list(torch.autograd.grad(loss, w))


def reference(model, batches, rho=RHO, nesterov=False):
    w = [p.detach().clone() for p in model.parameters()]
    v = None
    for x, y in batches:
        if v is None:
            w_tilde = w
        else:
            norm = torch.sqrt(sum((t * t).sum() for t in v))
            w_tilde = [a - rho * b / (norm + 1e-12) for a, b in zip(w, v)]
        g = grad_at(model, w_tilde, x, y)
        v = [gi.clone() for gi in g] if v is None else [MU * a + b for a, b in zip(v, g)]
        step = [gi + MU * vi for gi, vi in zip(g, v)] if nesterov else v
        w = [a - LR * s for a, s in zip(w, step)]
    return w


def closure_run(opt, model, batches):
    for x, y in batches:

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def assert_close(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("foreach", [None, False])
def test_momentum_sam_is_the_papers_algorithm(nesterov, foreach):
    model, batches = problem()
    expected = reference(model, batches, nesterov=nesterov)
    copied = copy.deepcopy(model)
    opt = MomentumSAM(
        copied.parameters(), torch.optim.SGD, rho=RHO, foreach=foreach, lr=LR, momentum=MU,
        nesterov=nesterov,
    )  # fmt: skip
    assert_close(closure_run(opt, copied, batches), expected)
    # rho = 0 is SGD with momentum
    copied = copy.deepcopy(model)
    opt = MomentumSAM(copied.parameters(), torch.optim.SGD, rho=0.0, lr=LR, momentum=MU)
    sgd_model = copy.deepcopy(model)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=LR, momentum=MU)
    assert_close(closure_run(opt, copied, batches), closure_run(sgd, sgd_model, batches))


def test_the_perturbation_is_along_minus_the_momentum_and_restored_exactly():
    model, batches = problem(1)
    opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MU)
    closure_run(opt, model, batches[:2])
    w = [p.detach().clone() for p in model.parameters()]
    v = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    norm = torch.sqrt(sum((t * t).sum() for t in v))
    assert opt.pre_perturb()
    assert_close(
        [p.detach() for p in model.parameters()],
        [a - RHO * b / (norm + 1e-12) for a, b in zip(w, v)],
    )
    opt.unperturb()
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), w))  # bit for bit


def test_the_two_call_form_and_adam_first_moment():
    model, batches = problem(2)
    expected = reference(model, batches)
    copied = copy.deepcopy(model)
    opt = MomentumSAM(copied.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MU)
    for x, y in batches:
        opt.pre_perturb()
        nn.functional.cross_entropy(copied(x), y).backward()
        opt.second_step(zero_grad=True)
    assert_close([p.detach() for p in copied.parameters()], expected)
    with pytest.raises(RuntimeError, match="pre_perturb"):
        opt.first_step()
    # AdamW: the first moment exp_avg is the momentum
    opt = MomentumSAM(model.parameters(), torch.optim.AdamW, rho=RHO, lr=1e-3)
    closure_run(opt, model, batches[:2])
    w = [p.detach().clone() for p in model.parameters()]
    m = [opt.state[p]["exp_avg"] for p in model.parameters()]
    norm = torch.sqrt(sum((t * t).sum() for t in m))
    opt.pre_perturb()
    assert_close(
        [p.detach() for p in model.parameters()],
        [a - RHO * b / (norm + 1e-12) for a, b in zip(w, m)],
    )
    opt.unperturb()


def test_resume_and_a_skipped_step():
    model, batches = problem(3, steps=6)
    factory = lambda p: MomentumSAM(p, torch.optim.SGD, rho=RHO, lr=LR, momentum=MU)  # noqa: E731
    copied = copy.deepcopy(model)
    straight = closure_run(factory(copied.parameters()), copied, batches)
    half = copy.deepcopy(model)
    opt = factory(half.parameters())
    closure_run(opt, half, batches[:3])
    saved = copy.deepcopy(opt.state_dict())
    # a non-finite pass: skipped, the weights restored from w~ and the momentum untouched
    before = [p.detach().clone() for p in half.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in half.parameters()]
    x, y = batches[3]

    def poisoned():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(half(x), y) * math.inf
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(poisoned)
    assert all(torch.equal(p, b) for p, b in zip(half.parameters(), before))
    assert all(
        torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(half.parameters(), momentum)
    )
    opt.zero_grad()
    fresh = factory(half.parameters())
    fresh.load_state_dict(saved)
    resumed = closure_run(fresh, half, batches[3:])
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"adaptive": True}, "adaptive"),
        ({"ascent_steps": 2}, "ascent_steps"),
        ({"norm": math.inf}, "norm"),
    ],
)
def test_refused_options(kwargs, message):
    model, _ = problem()
    with pytest.raises(ValueError, match=message):
        MomentumSAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MU, **kwargs)
