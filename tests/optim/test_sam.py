"""Exact tests of SAM / ASAM: closed forms on a quadratic, param groups, API, LR schedulers and
ascent steps.

The quadratic is ``L(w) = mean_i 0.5 (x_i . w - y_i)^2 + 0.5 mu ||w||^2 = 0.5 w^T A w - b^T w + c``
with ``A = X^T X / B + mu I`` (positive definite) and ``b = X^T y / B``, over several parameter
tensors in two param groups; its gradient ``A w - b`` is computed in closed form in float64.
"""

import math
import warnings

import pytest
import torch
from torch.optim import SGD, AdamW
from torch.optim.lr_scheduler import LambdaLR, StepLR

from samkit.optim import SAM

F64 = torch.float64
INF = math.inf
ETA = 0.01  # SAM's default adaptive_eta


def assert_close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


class Quad:
    """Least squares + L2 on the concatenation of several parameter tensors."""

    def __init__(self, seed=0, shapes=((2, 3), (4,), (3,)), batch=10, mu=0.1):
        gen = torch.Generator().manual_seed(seed)
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes]
        n = sum(self.sizes)
        self.X = torch.randn(batch, n, generator=gen, dtype=F64)
        self.y = torch.randn(batch, generator=gen, dtype=F64)
        self.mu = mu
        self.w0 = torch.randn(n, generator=gen, dtype=F64)

    def params(self, w=None):
        w = self.w0 if w is None else w
        return [
            c.reshape(s).clone().requires_grad_() for c, s in zip(w.split(self.sizes), self.shapes)
        ]

    @staticmethod
    def flat(ps):
        return torch.cat([p.detach().reshape(-1) for p in ps])

    def per_sample(self, ps, index=None):
        w = torch.cat([p.reshape(-1) for p in ps])
        X, y = (self.X, self.y) if index is None else (self.X[index], self.y[index])
        return 0.5 * (X @ w - y) ** 2 + 0.5 * self.mu * (w @ w)

    def loss(self, ps):
        return self.per_sample(ps).mean()

    def value(self, w):
        return (0.5 * (self.X @ w - self.y) ** 2).mean() + 0.5 * self.mu * (w @ w)

    def grad(self, w):
        return self.X.T @ (self.X @ w - self.y) / len(self.y) + self.mu * w

    def lr_vector(self, lrs_per_tensor):
        return torch.cat(
            [torch.full((n,), lr, dtype=F64) for n, lr in zip(self.sizes, lrs_per_tensor)]
        )


def closed_form_e(w, g, rho, norm, adaptive, eta=ETA):
    """SAM/ASAM perturbation: rho T^2 g / ||T g|| (p = 2) or rho T sign(g) (p = inf), with
    T = 1 (SAM) or |w| + eta (ASAM)."""
    t = w.abs() + eta if adaptive else torch.ones_like(w)
    if norm == 2.0:
        return rho * t * t * g / (t * g).norm()
    return rho * t * torch.sign(g)


def two_groups(ps, **group1):
    return [dict(params=ps[:2], **group1), dict(params=ps[2:], lr=0.03)]


VARIANTS = {
    "sam": dict(norm=2.0, adaptive=False),
    "asam": dict(norm=2.0, adaptive=True),
    "sam_inf": dict(norm=INF, adaptive=False),
    "asam_inf": dict(norm=INF, adaptive=True),
}
RHO = 0.07


def expected_one_step(q, variant):
    w = q.w0
    e = closed_form_e(w, q.grad(w), RHO, **VARIANTS[variant])
    lr = q.lr_vector([0.1, 0.1, 0.03])
    return e, w - lr * q.grad(w + e)


def make_sam(ps, variant, foreach):
    return SAM(two_groups(ps), SGD, rho=RHO, foreach=foreach, lr=0.1, **VARIANTS[variant])


def run_two_step_api(q, opt, ps):
    q.loss(ps).backward()
    first = opt.first_step(zero_grad=True)
    perturbed = q.flat(ps)
    assert all(p.grad is None for p in ps)
    q.loss(ps).backward()
    second = opt.second_step(zero_grad=True)
    return first, perturbed, second


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_step_matches_closed_form(variant, foreach):
    q = Quad()
    ps = q.params()
    opt = make_sam(ps, variant, foreach)
    e, after = expected_one_step(q, variant)
    first, perturbed, second = run_two_step_api(q, opt, ps)
    assert first is True and second is True
    assert_close(perturbed, q.w0 + e)
    assert_close(q.flat(ps), after)
    if VARIANTS[variant]["norm"] == 2.0:
        t = q.w0.abs() + ETA if VARIANTS[variant]["adaptive"] else 1.0
        assert ((e / t).norm() - RHO).abs() < 1e-12  # on the (scaled) rho-sphere
    # the SAM gradient norm reported by second_step is that of the second-pass gradient
    assert_close(opt.last_grad_norm, q.grad(q.w0 + e).norm())


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_closure_api_equals_two_step_api_and_closed_form(variant, foreach):
    q = Quad()
    ps_a, ps_b = q.params(), q.params()
    opt_a, opt_b = make_sam(ps_a, variant, foreach), make_sam(ps_b, variant, foreach)
    calls = []

    def closure():
        opt_b.zero_grad()
        calls.append(q.flat(ps_b))
        loss = q.loss(ps_b)
        loss.backward()
        return loss

    for _ in range(3):
        run_two_step_api(q, opt_a, ps_a)
        w_before = q.flat(ps_b)
        loss = opt_b.step(closure)
        assert_close(loss.detach(), q.value(w_before))  # step returns the first-pass loss
        for a, b in zip(ps_a, ps_b):
            assert torch.equal(a, b)
    assert len(calls) == 6  # exactly two passes per step
    # and the first of them matches the closed form
    e, after = expected_one_step(q, variant)
    assert_close(calls[1], q.w0 + e)
    assert_close(calls[2], after)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_foreach_and_loop_paths_agree(variant):
    q = Quad()
    ps_a, ps_b = q.params(), q.params()
    opt_a, opt_b = make_sam(ps_a, variant, True), make_sam(ps_b, variant, False)
    for _ in range(5):
        run_two_step_api(q, opt_a, ps_a)
        run_two_step_api(q, opt_b, ps_b)
    assert_close(q.flat(ps_a), q.flat(ps_b), tol=1e-14)


def test_norm_is_global_over_all_groups():
    """One group per tensor: the perturbation of each is g_i / ||g||, not g_i / ||g_i||."""
    q = Quad()
    ps = q.params()
    opt = SAM([{"params": [p]} for p in ps], SGD, rho=RHO, lr=0.1)
    q.loss(ps).backward()
    opt.first_step()
    g = q.grad(q.w0)
    assert_close(q.flat(ps), q.w0 + RHO * g / g.norm())
    assert abs((q.flat(ps) - q.w0).norm().item() - RHO) < 1e-12


def test_gradient_clipping_of_sam_gradient():
    q = Quad()
    ps = q.params()
    opt = SAM(ps, SGD, rho=RHO, lr=0.1)
    q.loss(ps).backward()
    opt.first_step(zero_grad=True)
    q.loss(ps).backward()
    e = closed_form_e(q.w0, q.grad(q.w0), RHO, 2.0, False)
    g2 = q.grad(q.w0 + e)
    max_norm = 0.5 * g2.norm().item()
    assert opt.second_step(max_grad_norm=max_norm)
    assert_close(q.flat(ps), q.w0 - 0.1 * g2 * max_norm / (g2.norm() + 1e-6))


def test_repeated_first_step_starts_from_the_clean_weights():
    q = Quad()
    ps = q.params()
    opt = SAM(ps, SGD, rho=RHO, lr=0.1)
    q.loss(ps).backward()
    opt.first_step(zero_grad=True)
    g_new = torch.linspace(-1.0, 1.0, len(q.w0), dtype=F64)
    for p, g in zip(ps, q.params(g_new)):
        p.grad = g.detach()
    opt.first_step(zero_grad=True)  # again: perturb w, not w + e
    assert_close(q.flat(ps), q.w0 + RHO * g_new / g_new.norm())
    opt.unperturb()
    assert torch.equal(q.flat(ps), q.w0)


# ---------------------------------------------------------------- per-group rho / adaptive


@pytest.mark.parametrize("foreach", [True, False])
def test_per_group_rho_zero_group_not_perturbed(foreach):
    q = Quad()
    ps = q.params()
    opt = SAM(
        [{"params": ps[:2], "rho": 0.1}, {"params": ps[2:], "rho": 0.0}],
        SGD,
        lr=0.1,
        foreach=foreach,
    )
    q.loss(ps).backward()
    assert opt.first_step()
    g = q.grad(q.w0)
    n1 = sum(q.sizes[:2])
    # the norm is global (both groups), group 2 gets rho = 0
    assert_close(q.flat(ps)[:n1], q.w0[:n1] + 0.1 * g[:n1] / g.norm())
    assert torch.equal(ps[2].detach(), q.w0[n1:])


@pytest.mark.parametrize("norm", [2.0, INF])
def test_adaptive_per_group(norm):
    q = Quad()
    ps = q.params()
    opt = SAM(
        [{"params": ps[:2], "rho": 0.1, "adaptive": True}, {"params": ps[2:], "rho": 0.05}],
        SGD,
        lr=0.1,
        norm=norm,
        adaptive_eta=0.02,
    )
    q.loss(ps).backward()
    opt.first_step()
    w, g = q.w0, q.grad(q.w0)
    n1 = sum(q.sizes[:2])
    t = torch.cat([w[:n1].abs() + 0.02, torch.ones_like(w[n1:])])
    rho = torch.cat(
        [torch.full((n1,), 0.1, dtype=F64), torch.full((len(w) - n1,), 0.05, dtype=F64)]
    )
    if norm == 2.0:
        e = rho * t * t * g / (t * g).norm()
    else:
        e = rho * t * torch.sign(g)
    assert_close(q.flat(ps), w + e)


def test_per_group_base_hyperparameters_are_used():
    """Group 2 has its own lr and momentum; the base optimizer sees them."""
    q = Quad()
    ps_a, ps_b = q.params(), q.params()
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.03, "momentum": 0.5}]  # noqa: E731
    sam = SAM(groups(ps_a), SGD, rho=0.0, lr=0.1, momentum=0.9)
    sgd = SGD(groups(ps_b), lr=0.1, momentum=0.9)
    for _ in range(3):
        run_two_step_api(q, sam, ps_a)
        q.loss(ps_b).backward()
        sgd.step()
        sgd.zero_grad()
    for a, b in zip(ps_a, ps_b):  # rho = 0 is the base optimizer, bit for bit
        assert torch.equal(a, b)


# ---------------------------------------------------------------- base optimizer instance


def test_base_optimizer_instance_shares_state_and_matches_class():
    q = Quad()
    ps_a, ps_b = q.params(), q.params()
    base = SGD(ps_a, lr=0.1, momentum=0.9, nesterov=True)
    sam_a = SAM(ps_a, base, rho=RHO)
    sam_b = SAM(ps_b, SGD, rho=RHO, lr=0.1, momentum=0.9, nesterov=True)
    assert sam_a.base_optimizer is base
    assert sam_a.param_groups is base.param_groups and sam_a.state is base.state
    for _ in range(3):
        run_two_step_api(q, sam_a, ps_a)
        run_two_step_api(q, sam_b, ps_b)
    for a, b in zip(ps_a, ps_b):
        assert torch.equal(a, b)
    assert set(base.state) == set(ps_a)
    assert all(
        torch.equal(sam_a.state[p]["momentum_buffer"], base.state[p]["momentum_buffer"])
        for p in ps_a
    )
    assert sam_a.state_dict()["state"].keys() == base.state_dict()["state"].keys()


def test_base_optimizer_instance_with_rho_in_its_groups():
    q = Quad()
    ps = q.params()
    base = SGD([{"params": ps[:2], "rho": 0.1}, {"params": ps[2:], "rho": 0.0}], lr=0.1)
    sam = SAM(ps, base)
    assert [g["rho"] for g in sam.param_groups] == [0.1, 0.0]


def test_base_optimizer_instance_honours_per_group_options_in_params():
    """BUG (_base.py, SharpnessAwareOptimizer.__init__, instance branch): with an optimizer
    instance, per-group ``rho`` / ``adaptive`` given in ``params`` are silently dropped: the
    groups are taken from ``base_optimizer.param_groups`` and get the SAM defaults instead. They
    should be honoured (or rejected with an error)."""
    q = Quad()
    ps = q.params()
    base = SGD([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.1)
    sam = SAM(
        [{"params": ps[:2], "rho": 0.1, "adaptive": True}, {"params": ps[2:], "rho": 0.0}], base
    )
    assert [(g["rho"], g["adaptive"]) for g in sam.param_groups] == [(0.1, True), (0.0, False)]


def test_mismatching_instance_params_raise():
    q = Quad()
    ps = q.params()
    with pytest.raises(ValueError, match="same parameters"):
        SAM(ps[:2], SGD(ps, lr=0.1))
    with pytest.raises(ValueError, match="same parameters"):
        SAM(ps, SGD(ps[1:], lr=0.1))
    other = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="same parameters"):
        SAM(ps[:2] + other, SGD(ps, lr=0.1))


def test_bad_arguments_raise_clear_errors():
    ps = Quad().params()
    with pytest.raises(ValueError, match="rho"):
        SAM(ps, SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        SAM(ps, SGD, rho=float("nan"), lr=0.1)
    with pytest.raises(ValueError, match="norm"):
        SAM(ps, SGD, norm=3, lr=0.1)
    with pytest.raises(ValueError, match="norm"):
        SAM(ps, SGD, norm=1, lr=0.1)
    with pytest.raises(ValueError, match="ascent_steps"):
        SAM(ps, SGD, ascent_steps=0, lr=0.1)
    with pytest.raises(ValueError, match="ascent_steps"):
        SAM(ps, SGD, ascent_steps=1.5, lr=0.1)
    for bad in ("SGD", torch.nn.Linear, torch.nn.Linear(2, 2), None, SGD.step):
        with pytest.raises(TypeError, match="base_optimizer"):
            SAM(ps, bad, lr=0.1)
    with pytest.raises(TypeError, match=r"\['lr', 'momentum'\]"):
        SAM(ps, SGD(ps, lr=0.1), lr=0.1, momentum=0.9)
    # a well-formed call still works, and norm may be given as float("inf") or an int 2
    SAM(ps, SGD, norm=float("inf"), lr=0.1)
    SAM(ps, SGD, norm=2, lr=0.1)


def test_step_without_closure_raises_helpful_error():
    ps = Quad().params()
    opt = SAM(ps, SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="closure") as info:
        opt.step()
    assert "first_step" in str(info.value) and "second_step" in str(info.value)


# ---------------------------------------------------------------- LR schedulers


def _no_scheduler_warnings(record):
    return [
        str(w.message)
        for w in record
        if "lr_scheduler" in str(w.message) or "overridden" in str(w.message)
    ]


def test_step_lr_attached_to_sam_drives_base_lr_with_two_step_api():
    q = Quad()
    ps = q.params()
    opt = SAM(ps, SGD, rho=RHO, lr=0.1)
    sched = StepLR(opt, step_size=2, gamma=0.5)
    expected_lrs = [0.1, 0.1, 0.05, 0.05, 0.025]
    w = q.w0.clone()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for lr in expected_lrs:
            assert opt.base_optimizer.param_groups[0]["lr"] == lr
            e = closed_form_e(w, q.grad(w), RHO, 2.0, False)
            w = w - lr * q.grad(w + e)
            run_two_step_api(q, opt, ps)
            assert_close(q.flat(ps), w)
            sched.step()
    assert _no_scheduler_warnings(record) == []


def test_lambda_lr_attached_to_sam_with_closure_api():
    q = Quad()
    ps = q.params()
    opt = SAM([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.2}], SGD, rho=RHO, lr=0.1)
    sched = LambdaLR(opt, lr_lambda=lambda k: 1.0 / (1 + k))
    lr_vec = q.lr_vector([0.1, 0.1, 0.2])

    def closure():
        opt.zero_grad()
        loss = q.loss(ps)
        loss.backward()
        return loss

    w = q.w0.clone()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for k in range(4):
            assert [g["lr"] for g in opt.base_optimizer.param_groups] == pytest.approx(
                [0.1 / (1 + k), 0.2 / (1 + k)]
            )
            e = closed_form_e(w, q.grad(w), RHO, 2.0, False)
            w = w - lr_vec / (1 + k) * q.grad(w + e)
            opt.step(closure)
            assert_close(q.flat(ps), w)
            sched.step()
    assert _no_scheduler_warnings(record) == []


def test_scheduler_attached_to_base_optimizer_instance():
    q = Quad()
    ps = q.params()
    base = SGD(ps, lr=0.1)
    opt = SAM(ps, base, rho=RHO)
    sched = StepLR(base, step_size=1, gamma=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_two_step_api(q, opt, ps)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert _no_scheduler_warnings(record) == []


def test_adamw_with_sam_one_step_closed_form():
    """The first AdamW step is w (1 - lr wd) - lr g / (|g| + eps): m_hat = g, v_hat = g^2."""
    q = Quad()
    ps = q.params()
    opt = SAM(ps, AdamW, rho=RHO, lr=0.01, weight_decay=0.1, eps=1e-8)
    run_two_step_api(q, opt, ps)
    w = q.w0
    g2 = q.grad(w + closed_form_e(w, q.grad(w), RHO, 2.0, False))
    expected = w * (1 - 0.01 * 0.1) - 0.01 * g2 / (g2.abs() + 1e-8)
    assert_close(q.flat(ps), expected)


# ---------------------------------------------------------------- ascent steps


def perturbation_after_k_ascent_steps(q, k, norm, adaptive=False, rho=0.5):
    ps = q.params()
    opt = SAM(ps, SGD, rho=rho, lr=0.1, norm=norm, adaptive=adaptive, ascent_steps=k)
    seen = []

    def closure():
        opt.zero_grad()
        seen.append(q.flat(ps))
        loss = q.loss(ps)
        loss.backward()
        return loss

    opt.step(closure)
    assert len(seen) == k + 1  # first pass, k - 1 ascent passes, second pass
    assert torch.equal(seen[0], q.w0)
    return [s - q.w0 for s in seen[1:]], q.flat(ps)


def test_ascent_steps_one_is_plain_sam():
    q = Quad()
    (e1,), after1 = perturbation_after_k_ascent_steps(q, 1, 2.0, rho=RHO)
    ps = q.params()
    run_two_step_api(q, SAM(ps, SGD, rho=RHO, lr=0.1), ps)
    assert torch.equal(after1, q.flat(ps))
    assert_close(e1, closed_form_e(q.w0, q.grad(q.w0), RHO, 2.0, False))


@pytest.mark.parametrize("norm", [2.0, INF])
def test_two_ascent_steps_closed_form(norm):
    """Projected ascent in the scaled coordinates y = e / rho:
    y1 = dir(g0), y2 = Proj(y1 + dir(g1))."""
    q = Quad()
    rho = 0.5
    es, after = perturbation_after_k_ascent_steps(q, 2, norm, rho=rho)
    w = q.w0

    def direction(g):
        return g / g.norm() if norm == 2.0 else torch.sign(g)

    y1 = direction(q.grad(w))
    y2 = y1 + direction(q.grad(w + rho * y1))
    y2 = y2 / max(1.0, y2.norm().item()) if norm == 2.0 else y2.clamp(-1, 1)
    assert_close(es[0], rho * y1)
    assert_close(es[1], rho * y2)
    assert_close(after, w - 0.1 * q.grad(w + rho * y2))


@pytest.mark.parametrize("norm", [2.0, INF])
def test_ascent_steps_stay_in_ball_and_loss_is_non_decreasing(norm):
    q = Quad(seed=1, mu=0.01)
    rho = 0.5
    values = []
    for k in range(1, 7):
        es, _ = perturbation_after_k_ascent_steps(q, k, norm, rho=rho)
        e = es[-1]
        if norm == 2.0:
            assert e.norm().item() <= rho * (1 + 1e-12)
        else:
            assert e.abs().max().item() <= rho * (1 + 1e-12)
        values.append(q.value(q.w0 + e).item())
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:])), values
    assert values[-1] > values[0] + 1e-6  # the extra ascent steps do something


def test_adaptive_ascent_steps_stay_in_scaled_ball():
    q = Quad(seed=3)
    rho = 0.5
    t = q.w0.abs() + ETA
    for k in (1, 2, 4):
        es, _ = perturbation_after_k_ascent_steps(q, k, 2.0, adaptive=True, rho=rho)
        assert (es[-1] / t).norm().item() <= rho * (1 + 1e-12)
    # the first ascent point is the ASAM perturbation
    assert_close(es[0], closed_form_e(q.w0, q.grad(q.w0), rho, 2.0, True))


def test_ascent_step_needs_first_step():
    ps = Quad().params()
    opt = SAM(ps, SGD, lr=0.1, ascent_steps=2)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.ascent_step()
