"""LookSAM, AE-SAM, RST and late-phase SAM (SAM on some steps only) against references written
here from the papers' equations: float64, plain SGD as the base optimizer (each update is exactly
``w - lr * u``), the closure form ``opt.step(closure)`` (one pass when the policy says no)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from samkit.optim.ascent_policy import (
    AESAM,
    RST,
    EveryKPolicy,
    GradientNormPolicy,
    LatePhasePolicy,
    LateSAM,
    RandomPolicy,
)
from samkit.optim.gsam import GSAM
from samkit.optim.looksam import LookSAM

LR, RHO = 0.1, 0.05


def problem(seed: int = 0, steps: int = 6):
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


def loss_at(model, w, x, y):
    params = dict(zip([n for n, _ in model.named_parameters()], w))
    return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)


def grad_at(model, w, x, y):
    w = [t.detach().requires_grad_(True) for t in w]
    return list(torch.autograd.grad(loss_at(model, w, x, y), w))


def dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def sam_point(w, g, rho=RHO):
    norm = torch.sqrt(dot(g, g))
    return [t + rho * gi / (norm + 1e-12) for t, gi in zip(w, g)]


def run(factory, model, batches):
    """The closure form; returns the weights, the optimizer and the passes each step took."""
    model = copy.deepcopy(model)
    opt = factory(model.parameters())
    passes = []
    for x, y in batches:
        calls = []

        def closure(x=x, y=y, calls=calls):
            calls.append(1)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        passes.append(len(calls))
    return [p.detach().clone() for p in model.parameters()], opt, passes


def assert_close(a, b, atol=1e-12):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


# -- LookSAM ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k,alpha", [(3, 0.5), (1, 0.7), (2, 0.0)])
def test_looksam_is_the_papers_algorithm(k, alpha):
    model, batches = problem(1, steps=7)
    w = [p.detach().clone() for p in model.parameters()]
    g_v = None
    for t, (x, y) in enumerate(batches):
        g = grad_at(model, w, x, y)
        if t % k == 0:  # SAM, and the component of g_s orthogonal to g is kept
            g_s = grad_at(model, sam_point(w, g), x, y)
            coef = dot(g_s, g) / dot(g, g)
            g_v = [a - coef * b for a, b in zip(g_s, g)]
            u = g_s
        else:  # one pass: g + alpha ||g|| / ||g_v|| g_v
            scale = alpha * torch.sqrt(dot(g, g) / dot(g_v, g_v))
            u = [a + scale * b for a, b in zip(g, g_v)]
        w = [t_ - LR * ui for t_, ui in zip(w, u)]
    got, opt, passes = run(
        lambda p: LookSAM(p, torch.optim.SGD, rho=RHO, k=k, alpha=alpha, lr=LR), model, batches
    )
    assert_close(got, w)
    assert passes == [2 if t % k == 0 else 1 for t in range(len(batches))]
    assert opt.ascent_policy.steps == len(batches)
    assert_close([opt._gv[p] for p in opt.param_groups[0]["params"]], g_v)
    if k == 1:  # every step is SAM: the last g_v is orthogonal to the last g
        assert abs(dot(g_v, g).item()) < 1e-12


# -- AE-SAM ----------------------------------------------------------------------------------


def test_aesam_is_the_papers_policy():
    delta, lam1, lam2, steps = 0.6, -1.0, 1.0, 8
    model, batches = problem(2, steps=steps)
    w = [p.detach().clone() for p in model.parameters()]
    mu = var = 0.0
    decisions = []
    for t, (x, y) in enumerate(batches):
        g = grad_at(model, w, x, y)
        sq = dot(g, g).item()
        mu = delta * mu + (1 - delta) * sq
        var = delta * var + (1 - delta) * (sq - mu) ** 2
        c = (t / steps) * lam1 + (1 - t / steps) * lam2  # from lambda2 to lambda1
        sam = sq >= mu + c * math.sqrt(var)
        decisions.append(sam)
        u = grad_at(model, sam_point(w, g), x, y) if sam else g
        w = [t_ - LR * ui for t_, ui in zip(w, u)]
    assert True in decisions and False in decisions  # both branches are exercised
    got, opt, passes = run(
        lambda p: AESAM(
            p, torch.optim.SGD, rho=RHO, delta=delta, lambda1=lam1, lambda2=lam2,
            total_steps=steps, lr=LR,
        ),
        model,
        batches,
    )  # fmt: skip
    assert_close(got, w)
    assert passes == [2 if d else 1 for d in decisions]
    policy = opt.ascent_policy
    assert math.isclose(policy.mean, mu, rel_tol=1e-12)
    assert math.isclose(policy.var, var, rel_tol=1e-9)


def test_aesam_statistic_is_unscaled_by_the_grad_scaler():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    policies = []
    for scale in (1.0, scaler.get_scale()):
        model, batches = problem(3, steps=1)
        opt = AESAM(model.parameters(), torch.optim.SGD, lambda1=0.5, lambda2=0.5, lr=LR)
        x, y = batches[0]
        (nn.functional.cross_entropy(model(x), y) * scale).backward()
        opt.wants_ascent(scaler=scaler if scale != 1.0 else None)
        policies.append(opt.ascent_policy._pending)
    assert policies[0] is not None
    assert math.isclose(policies[0][0], policies[1][0], rel_tol=1e-12)


def test_aesam_non_finite_gradient_says_no_and_moves_nothing():
    model, batches = problem(4, steps=3)
    opt = AESAM(model.parameters(), torch.optim.SGD, lambda1=0.0, lambda2=0.0, lr=LR)
    run_on(opt, model, batches[:2])
    policy = opt.ascent_policy
    before = (policy.mean, policy.var, policy.steps)
    weights = [p.detach().clone() for p in model.parameters()]
    x, y = batches[2]

    def poisoned():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) * math.inf
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="non-finite gradient in the first pass"):
        opt.step(poisoned)
    assert (policy.mean, policy.var) == before[:2] and policy.steps == before[2] + 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))
    assert opt.skipped_steps == 1


# -- RST / SS-SAM ----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule,p,p_end", [("constant", 0.5, None), ("linear", 0.9, 0.1)])
def test_rst_draws_a_bernoulli_per_step(schedule, p, p_end):
    seed, steps = 3, 8
    model, batches = problem(5, steps=steps)
    gen = torch.Generator().manual_seed(seed)
    w = [p_.detach().clone() for p_ in model.parameters()]
    decisions = []
    for t, (x, y) in enumerate(batches):
        p_t = p if schedule == "constant" else p + (p_end - p) * t / steps
        sam = torch.rand((), generator=gen, dtype=torch.float64).item() < p_t
        decisions.append(sam)
        g = grad_at(model, w, x, y)
        u = grad_at(model, sam_point(w, g), x, y) if sam else g
        w = [t_ - LR * ui for t_, ui in zip(w, u)]
    assert True in decisions and False in decisions
    got, opt, passes = run(
        lambda ps: RST(
            ps, torch.optim.SGD, rho=RHO, p=p, p_end=p_end, schedule=schedule, seed=seed,
            total_steps=steps, lr=LR,
        ),
        model,
        batches,
    )  # fmt: skip
    assert_close(got, w)
    assert passes == [2 if d else 1 for d in decisions]


def test_rst_schedules():
    def at(schedule, t, total=10, p=0.8, p_end=0.2):
        policy = RandomPolicy(p, p_end=p_end, schedule=schedule, total_steps=total)
        policy.steps = t
        return policy.probability()

    assert at("constant", 7) == 0.8
    assert (at("piecewise", 4), at("piecewise", 5)) == (0.8, 0.2)
    assert at("linear", 0) == 0.8 and math.isclose(at("linear", 5), 0.5)
    assert math.isclose(at("linear", 10), 0.2) and math.isclose(at("linear", 20), 0.2)
    assert at("cosine", 0) == 0.8 and math.isclose(at("cosine", 5), 0.5)
    assert math.isclose(at("cosine", 10), 0.2)
    with pytest.raises(ValueError, match="total_steps"):
        RandomPolicy(0.5, p_end=0.1, schedule="linear").probability()


# -- late-phase SAM --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"start_fraction": 0.5, "total_steps": 6}, {"start_step": 3}])
def test_late_sam_switches_from_sgd_to_sam(kwargs):
    model, batches = problem(6, steps=6)
    w = [p.detach().clone() for p in model.parameters()]
    for t, (x, y) in enumerate(batches):
        g = grad_at(model, w, x, y)
        u = grad_at(model, sam_point(w, g), x, y) if t >= 3 else g
        w = [t_ - LR * ui for t_, ui in zip(w, u)]
    got, _, passes = run(
        lambda p: LateSAM(p, torch.optim.SGD, rho=RHO, lr=LR, **kwargs), model, batches
    )
    assert_close(got, w)
    assert passes == [1, 1, 1, 2, 2, 2]


# -- composition, resume, refusals -----------------------------------------------------------


def test_a_policy_combines_with_another_variant():
    """GSAM with RST's policy: GSAM's update on the draws that ascend, SGD on the others."""
    alpha, seed = 0.3, 11
    model, batches = problem(7, steps=6)
    gen = torch.Generator().manual_seed(seed)
    w = [p.detach().clone() for p in model.parameters()]
    for x, y in batches:
        g = grad_at(model, w, x, y)
        if torch.rand((), generator=gen, dtype=torch.float64).item() < 0.5:
            gp = grad_at(model, sam_point(w, g), x, y)
            coef = dot(g, gp) / dot(gp, gp)
            u = [b - alpha * (a - coef * b) for a, b in zip(g, gp)]
        else:
            u = g
        w = [t_ - LR * ui for t_, ui in zip(w, u)]

    def factory(p):
        opt = GSAM(p, torch.optim.SGD, rho=RHO, alpha=alpha, rho_min=RHO, lr=LR)
        opt.ascent_policy = RandomPolicy(0.5, seed=seed)
        return opt

    got, _, passes = run(factory, model, batches)
    assert_close(got, w)
    assert 1 in passes and 2 in passes


FACTORIES = {
    "looksam": lambda p: LookSAM(p, torch.optim.SGD, k=3, lr=LR, momentum=0.9),
    "aesam": lambda p: AESAM(p, torch.optim.SGD, total_steps=8, lr=LR, momentum=0.9),
    "rst": lambda p: RST(p, torch.optim.SGD, p=0.5, seed=1, lr=LR, momentum=0.9),
    "late": lambda p: LateSAM(p, torch.optim.SGD, start_step=4, lr=LR, momentum=0.9),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("foreach", [None, False])
def test_state_dict_resume_continues_bit_identically(name, foreach):
    def factory(p):
        opt = FACTORIES[name](p)
        opt.foreach = foreach
        return opt

    model, batches = problem(8, steps=8)
    straight, opt, passes = run(factory, model, batches)
    assert 1 in passes and 2 in passes
    half, first, _ = run(factory, model, batches[:5])
    saved = copy.deepcopy(first.state_dict())
    resumed_model = copy.deepcopy(model)
    with torch.no_grad():
        for p, v in zip(resumed_model.parameters(), half):
            p.copy_(v)
    fresh = factory(resumed_model.parameters())
    fresh.load_state_dict(saved)
    rest, _, _ = run_on(fresh, resumed_model, batches[5:])
    assert all(torch.equal(a, b) for a, b in zip(rest, straight))


def run_on(opt, model, batches):
    passes = []
    for x, y in batches:
        calls = []

        def closure(x=x, y=y, calls=calls):
            calls.append(1)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        passes.append(len(calls))
    return [p.detach().clone() for p in model.parameters()], opt, passes


def test_looksam_keeps_g_v_through_a_skipped_sam_step():
    model, batches = problem(9, steps=4)
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=2, lr=LR)
    run_on(opt, model, batches[:2])
    gv = {p: v.clone() for p, v in opt._gv.items()}
    weights = [p.detach().clone() for p in model.parameters()]
    x, y = batches[2]
    nn.functional.cross_entropy(model(x), y).backward()
    assert opt.wants_ascent()  # t = 2: a SAM step
    opt.first_step(zero_grad=True)
    (nn.functional.cross_entropy(model(x), y) * math.inf).backward()
    with pytest.warns(RuntimeWarning, match="second pass"):
        assert opt.second_step(zero_grad=True) is False
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))
    assert gv and all(torch.equal(opt._gv[p], gv[p]) for p in gv)


def test_the_two_call_form():
    """wants_ascent / skip_ascent by hand equal the closure form."""
    model, batches = problem(10, steps=6)
    factory = lambda p: RST(p, torch.optim.SGD, p=0.5, seed=2, lr=LR)  # noqa: E731
    closure_weights, _, passes = run(factory, model, batches)
    model = copy.deepcopy(model)
    opt = factory(model.parameters())
    for x, y in batches:
        nn.functional.cross_entropy(model(x), y).backward()
        if opt.wants_ascent():
            assert opt.wants_ascent()  # asked twice, the same answer (one draw per step)
            opt.first_step(zero_grad=True)
            nn.functional.cross_entropy(model(x), y).backward()
        else:
            opt.skip_ascent()
            assert opt.ascent_skipped
        opt.second_step(zero_grad=True)
    assert all(torch.equal(a, b.detach()) for a, b in zip(closure_weights, model.parameters()))
    assert 1 in passes and 2 in passes


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: EveryKPolicy(0), "k must be"),
        (lambda: RandomPolicy(1.5), "p must be"),
        (lambda: RandomPolicy(0.5, schedule="linear"), "give p_end"),
        (lambda: RandomPolicy(0.5, schedule="nope"), "schedule must be"),
        (lambda: GradientNormPolicy(delta=1.0), "delta must be"),
        (lambda: GradientNormPolicy(lambda1=math.nan), "lambda1 must be"),
        (lambda: LatePhasePolicy(1.5), "start_fraction must be"),
        (lambda: LatePhasePolicy(start_step=-1), "start_step must be"),
        (lambda: LatePhasePolicy(total_steps=0), "total_steps must be"),
    ],
)
def test_bad_policies_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_schedules_over_training_need_total_steps():
    model, batches = problem(11, steps=2)
    for cls in (AESAM, LateSAM):
        with pytest.raises(ValueError, match="total_steps"):
            copied = copy.deepcopy(model)
            run_on(cls(copied.parameters(), torch.optim.SGD, lr=LR), copied, batches)
        copied = copy.deepcopy(model)
        opt = cls(copied.parameters(), torch.optim.SGD, lr=LR)
        opt.ascent_policy.total_steps = 10  # settable once known, before the first step
        run_on(opt, copied, batches)
        assert opt.ascent_policy.steps == 2
    with pytest.raises(ValueError, match="alpha must be"):
        LookSAM(model.parameters(), torch.optim.SGD, alpha=-1.0, lr=LR)


def test_an_aesam_state_from_before_the_schedule_change_warns_on_load():
    policy = GradientNormPolicy(lambda1=-1.0, lambda2=1.0, total_steps=10)
    state = policy.state_dict()
    assert state["c_direction"] == "lambda2 to lambda1"
    fresh = GradientNormPolicy(lambda1=-1.0, lambda2=1.0, total_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(state)  # the same direction: silent
    old = {k: v for k, v in state.items() if k != "c_direction"}
    with pytest.warns(RuntimeWarning, match="switches direction at step 0"):
        fresh.load_state_dict(old)
    constant = GradientNormPolicy(lambda1=0.5, lambda2=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        constant.load_state_dict(old)  # no schedule, nothing changed
