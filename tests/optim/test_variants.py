"""GSAM, WSAM and Friendly-SAM against references written here from the papers' equations
(float64, plain SGD as the base optimizer so that each update is exactly ``w - lr * u``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from samkit.optim import SAM, create_optimizer
from samkit.optim.friendly_sam import FriendlySAM
from samkit.optim.gsam import GSAM
from samkit.optim.wsam import WSAM
from samkit.train import SharpnessAwareStep

LR, RHO = 0.1, 0.05


def problem(seed: int = 0) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
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
        for _ in range(3)
    ]
    return model, batches


def loss_at(model: nn.Module, w: list[torch.Tensor], x, y) -> torch.Tensor:
    params = dict(zip([n for n, _ in model.named_parameters()], w))
    out = torch.func.functional_call(model, params, (x,))
    return nn.functional.cross_entropy(out, y)


def grad_at(model, w, x, y) -> list[torch.Tensor]:
    w = [t.detach().requires_grad_(True) for t in w]
    return list(torch.autograd.grad(loss_at(model, w, x, y), w))


def dot(a, b) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def sam_point(w, g, rho):
    norm = torch.sqrt(dot(g, g))
    return [t + rho * gi / (norm + 1e-12) for t, gi in zip(w, g)]


def run(opt_factory, model, batches):
    model = copy.deepcopy(model)
    opt = opt_factory(model.parameters())
    for x, y in batches:

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()], opt


def assert_close(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_gsam_is_the_papers_update(alpha):
    model, batches = problem()
    w = [p.detach().clone() for p in model.parameters()]
    for x, y in batches:
        g = grad_at(model, w, x, y)
        gp = grad_at(model, sam_point(w, g, RHO), x, y)
        coef = dot(g, gp) / dot(gp, gp)
        g_perp = [gi - coef * gpi for gi, gpi in zip(g, gp)]
        w = [t - LR * (gpi - alpha * v) for t, gpi, v in zip(w, gp, g_perp)]
    got, _ = run(lambda p: GSAM(p, torch.optim.SGD, rho=RHO, alpha=alpha, lr=LR), model, batches)
    assert_close(got, w)
    if alpha == 0.0:  # alpha 0 is SAM
        assert_close(got, run(lambda p: SAM(p, torch.optim.SGD, rho=RHO, lr=LR), model, batches)[0])


def test_gsam_rho_follows_the_learning_rate():
    model, batches = problem(1)
    rho_min, lr_now = 0.01, 0.025  # a quarter of the peak learning rate LR
    rho_t = rho_min + (RHO - rho_min) * (lr_now - 0.0) / (LR - 0.0)
    w = [p.detach().clone() for p in model.parameters()]
    x, y = batches[0]
    g = grad_at(model, w, x, y)
    gp = grad_at(model, sam_point(w, g, rho_t), x, y)
    coef = dot(g, gp) / dot(gp, gp)
    expected = [t - lr_now * (gpi - 0.2 * (gi - coef * gpi)) for t, gi, gpi in zip(w, g, gp)]

    def factory(p):
        opt = GSAM(p, torch.optim.SGD, rho=RHO, alpha=0.2, rho_min=rho_min, lr=LR)
        for group in opt.param_groups:  # what an LR scheduler does
            group["lr"] = lr_now
        return opt

    got, opt = run(factory, model, batches[:1])
    assert_close(got, expected)
    assert opt.param_groups[0]["gsam_lr_max"] == LR
    assert opt._group_rho(opt.param_groups[0]) == pytest.approx(rho_t, abs=1e-15)


@pytest.mark.parametrize("decouple", [False, True])
def test_wsam_is_the_papers_update(decouple):
    gamma = 0.8
    a = gamma / (1 - gamma)
    model, batches = problem(2)
    w = [p.detach().clone() for p in model.parameters()]
    for x, y in batches:
        g = grad_at(model, w, x, y)
        gp = grad_at(model, sam_point(w, g, RHO), x, y)
        if decouple:  # base step with g, then the sharpness term outside it
            w = [t - LR * gi - LR * a * (gpi - gi) for t, gi, gpi in zip(w, g, gp)]
        else:
            w = [t - LR * (gi + a * (gpi - gi)) for t, gi, gpi in zip(w, g, gp)]
    got, _ = run(
        lambda p: WSAM(p, torch.optim.SGD, rho=RHO, gamma=gamma, decouple=decouple, lr=LR),
        model,
        batches,
    )
    assert_close(got, w)


def test_wsam_gamma_one_half_coupled_is_sam():
    model, batches = problem(3)
    wsam = run(lambda p: WSAM(p, torch.optim.SGD, gamma=0.5, decouple=False, lr=LR), model, batches)
    sam = run(lambda p: SAM(p, torch.optim.SGD, lr=LR), model, batches)
    assert_close(wsam[0], sam[0])


def test_friendly_sam_is_the_papers_update():
    sigma, lmbda = 0.7, 0.9
    model, batches = problem(4)
    w = [p.detach().clone() for p in model.parameters()]
    m = [torch.zeros_like(t) for t in w]
    for x, y in batches:
        g = grad_at(model, w, x, y)
        m = [lmbda * mi + (1 - lmbda) * gi for mi, gi in zip(m, g)]
        d = [gi - sigma * mi for gi, mi in zip(g, m)]
        gp = grad_at(model, sam_point(w, d, RHO), x, y)
        w = [t - LR * gpi for t, gpi in zip(w, gp)]
    got, opt = run(
        lambda p: FriendlySAM(p, torch.optim.SGD, rho=RHO, sigma=sigma, lmbda=lmbda, lr=LR),
        model,
        batches,
    )
    assert_close(got, w)
    params = list(opt._momentum)
    assert_close([opt._momentum[p] for p in params], m)


def test_friendly_sam_state_round_trips_and_a_skipped_step_leaves_it():
    model, batches = problem(5)
    factory = lambda p: FriendlySAM(p, torch.optim.SGD, lr=LR, momentum=0.9)  # noqa: E731
    straight, _ = run(factory, model, batches)
    # Two steps, a save and a load into a fresh optimizer, the third step: the same weights.
    half_model = copy.deepcopy(model)
    opt = factory(half_model.parameters())
    for x, y in batches[:2]:
        nn.functional.cross_entropy(half_model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(half_model(x), y).backward()
        opt.second_step(zero_grad=True)
    saved = copy.deepcopy(opt.state_dict())
    before = {p: m.clone() for p, m in opt._momentum.items()}
    # a step whose second pass is non-finite is skipped: weights, momentum and m unchanged
    x, y = batches[2]
    weights = [p.detach().clone() for p in half_model.parameters()]
    nn.functional.cross_entropy(half_model(x), y).backward()
    opt.first_step(zero_grad=True)
    (nn.functional.cross_entropy(half_model(x), y) * math.inf).backward()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert opt.second_step(zero_grad=True) is False
    assert_close([p.detach() for p in half_model.parameters()], weights)
    assert all(torch.equal(opt._momentum[p], before[p]) for p in before)
    fresh = factory(half_model.parameters())
    fresh.load_state_dict(saved)
    nn.functional.cross_entropy(half_model(x), y).backward()
    fresh.first_step(zero_grad=True)
    nn.functional.cross_entropy(half_model(x), y).backward()
    fresh.second_step(zero_grad=True)
    assert_close([p.detach() for p in half_model.parameters()], straight)


@pytest.mark.parametrize("name", ["gsam", "wsam", "fsam"])
def test_each_runs_under_the_step_helper_as_with_a_closure(name):
    model, batches = problem(6)
    factory = lambda p: create_optimizer(name, p, torch.optim.SGD, lr=LR)  # noqa: E731
    closure_weights, _ = run(factory, model, batches)
    helper_model = copy.deepcopy(model)
    step = SharpnessAwareStep(
        helper_model, factory(helper_model.parameters()), nn.functional.cross_entropy
    )
    for x, y in batches:
        assert step(x, y).took_step
    assert_close([p.detach() for p in helper_model.parameters()], closure_weights)
    with pytest.raises(ValueError, match="one first pass"):
        SharpnessAwareStep(helper_model, factory(helper_model.parameters()), lambda o, t: o, m=4)


@pytest.mark.parametrize(
    "cls,kwargs,message",
    [
        (GSAM, {"alpha": -1.0}, "alpha must be >= 0"),
        (GSAM, {"rho_min": 0.1}, "rho_min must be in"),
        (WSAM, {"gamma": 1.0}, "gamma must be in"),
        (FriendlySAM, {"lmbda": 1.0}, "lmbda must be in"),
        (FriendlySAM, {"sigma": -0.5}, "sigma must be >= 0"),
    ],
)
def test_bad_hyper_parameters_are_refused(cls, kwargs, message):
    model, _ = problem()
    with pytest.raises(ValueError, match=message):
        cls(model.parameters(), torch.optim.SGD, lr=LR, **kwargs)
