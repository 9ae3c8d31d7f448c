"""Safety of SAM / ESAM steps: zero and non-finite gradients, gradients that appear or vanish
between the passes, in-place restore, checkpoint contents and exact resume."""

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import SGD, AdamW

from samkit.optim import ESAM, SAM

F64 = torch.float64
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- helpers


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(F64)


def batches(n, size=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 5, generator=gen, dtype=F64),
            torch.randint(0, 3, (size,), generator=gen),
        )
        for _ in range(n)
    ]


def build(kind, model, **kw):
    params = model.parameters()
    if kind == "sgd":
        return SAM(
            params, SGD, rho=0.1, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, **kw
        )
    if kind == "adamw":
        return SAM(params, AdamW, rho=0.1, lr=1e-2, weight_decay=0.1, **kw)
    if kind == "esam":
        # loop path: SWP may drop every tensor, which the foreach path does not survive yet
        # (see test_first_step_without_any_gradient_is_a_no_op and test_esam.py)
        kw.setdefault("foreach", False)
        return ESAM(params, SGD, rho=0.1, beta=0.5, gamma=0.5, lr=0.1, momentum=0.9, **kw)
    raise AssertionError(kind)


def sam_closure(model, opt, batch, poison_call=None, poison=NAN, calls=None):
    """Closure for SAM.step; on call number ``poison_call`` its gradient gets a non-finite entry."""
    x, y = batch
    counter = [0] if calls is None else calls

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if counter[0] == poison_call:
            model[0].weight.grad[0, 0] = poison
        counter[0] += 1
        return loss

    return closure


def esam_closure(model, batch, poison_call=None, calls=None):
    x, y = batch
    counter = [0] if calls is None else calls

    def closure(index=None):
        xs, ys = (x, y) if index is None else (x[index], y[index])
        losses = F.cross_entropy(model(xs), ys, reduction="none")
        if counter[0] == poison_call:
            losses = losses * NAN
        counter[0] += 1
        return losses

    return closure


def train_step(kind, model, opt, batch):
    if kind == "esam":
        return opt.step(esam_closure(model, batch))
    return opt.step(sam_closure(model, opt, batch))


def clone_state(opt):
    return {
        p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for p, s in opt.state.items()
    }


def assert_state_equal(opt, saved):
    assert set(opt.state) == set(saved)
    for p, s in saved.items():
        now = opt.state[p]
        assert now.keys() == s.keys()
        for k, v in s.items():
            if torch.is_tensor(v):
                assert torch.equal(now[k], v), k
            else:
                assert now[k] == v, k


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_weights_equal(model, saved):
    for p, s in zip(model.parameters(), saved):
        assert torch.equal(p, s)


# ---------------------------------------------------------------- zero gradient


VARIANTS = [
    dict(norm=2.0, adaptive=False),
    dict(norm=2.0, adaptive=True),
    dict(norm=math.inf, adaptive=False),
    dict(norm=math.inf, adaptive=True),
]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("variant", VARIANTS, ids=["sam", "asam", "inf", "asam_inf"])
def test_zero_gradient_no_perturbation_and_exact_base_step(variant, foreach):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=F64) for s in [(3, 4), (4,), (2,)]]
    ps = [t.clone().requires_grad_() for t in init]
    ref = [t.clone().requires_grad_() for t in init]
    opt = SAM(
        [{"params": ps[:2]}, {"params": ps[2:]}],
        SGD,
        rho=0.1,
        lr=0.1,
        momentum=0.9,
        foreach=foreach,
        **variant,
    )
    ref_opt = SGD([{"params": ref[:2]}, {"params": ref[2:]}], lr=0.1, momentum=0.9)
    for _ in range(2):
        for p in ps:
            p.grad = torch.zeros_like(p)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert opt.first_step(zero_grad=True) is True
        for p, r in zip(ps, ref):  # not moved at all, no NaN
            assert torch.equal(p, r)
        g2 = [torch.randn(p.shape, generator=gen, dtype=F64) for p in ps]
        for p, r, g in zip(ps, ref, g2):
            p.grad, r.grad = g.clone(), g.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert opt.second_step(zero_grad=True) is True
        ref_opt.step()
        for p, r in zip(ps, ref):  # exactly the base update of the second-pass gradient
            assert torch.equal(p, r)
            assert torch.isfinite(p).all()
    assert opt.skipped_steps == 0


def test_zero_gradient_of_one_tensor_leaves_it_unperturbed():
    ps = [
        torch.ones(3, dtype=F64, requires_grad=True),
        torch.ones(2, dtype=F64, requires_grad=True),
    ]
    opt = SAM(ps, SGD, rho=0.1, lr=0.1)
    ps[0].grad = torch.zeros(3, dtype=F64)
    ps[1].grad = torch.tensor([3.0, 4.0], dtype=F64)
    opt.first_step()
    assert torch.equal(ps[0].detach(), torch.ones(3, dtype=F64))
    torch.testing.assert_close(
        ps[1].detach(), torch.tensor([1.06, 1.08], dtype=F64), rtol=1e-12, atol=1e-12
    )


def test_zero_gradient_with_closure_and_ascent_steps():
    """A loss flat at w: every pass has a zero gradient; no NaN, and weight decay still applies."""
    w = torch.ones(4, dtype=F64, requires_grad=True)
    opt = SAM([w], SGD, rho=0.1, lr=0.5, weight_decay=0.1, ascent_steps=3)

    def closure():
        opt.zero_grad()
        loss = (w * 0).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.equal(w.detach(), torch.full((4,), 1 - 0.5 * 0.1, dtype=F64))


# ---------------------------------------------------------------- non-finite gradients


@pytest.mark.parametrize("poison", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("bad_pass", ["first", "second"])
@pytest.mark.parametrize("foreach", [True, False])
def test_non_finite_gradient_skips_whole_step_two_step_api(bad_pass, kind, poison, foreach):
    data = batches(8)
    model, twin = mlp(), mlp()
    opt, twin_opt = build(kind, model, foreach=foreach), build(kind, twin, foreach=foreach)
    for b in data[:3]:  # a few normal steps first: stale state would show
        train_step(kind, model, opt, b)
        train_step(kind, twin, twin_opt, b)
    saved_w, saved_state = weights(model), clone_state(opt)
    saved_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    assert all(s for s in saved_state.values())  # there is momentum / Adam state to protect

    x, y = data[3]
    F.cross_entropy(model(x), y).backward()
    if bad_pass == "first":
        model[2].bias.grad[1] = poison
    ok1 = opt.first_step(zero_grad=True)
    assert ok1 is (bad_pass != "first")
    if not ok1:
        assert_weights_equal(model, saved_w)  # nothing was perturbed
    F.cross_entropy(model(x), y).backward()
    if bad_pass == "second":
        model[0].weight.grad[2, 1] = poison
    with pytest.warns(RuntimeWarning, match=f"non-finite gradient in the {bad_pass} pass"):
        ok2 = opt.second_step(zero_grad=True)
    assert ok2 is False
    assert opt.skipped_steps == 1
    assert opt.state_dict()["samkit"]["skipped_steps"] == 1
    assert_weights_equal(model, saved_w)
    assert_state_equal(opt, saved_state)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == saved_groups

    for b in data[4:]:  # carries on exactly as if the bad batch had never been seen
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            train_step(kind, model, opt, b)
        train_step(kind, twin, twin_opt, b)
    assert_weights_equal(model, weights(twin))
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("poison_call", [0, 1, 2], ids=["first", "ascent", "second"])
def test_non_finite_gradient_skips_whole_step_closure_api(kind, poison_call):
    data = batches(6)
    model, twin = mlp(), mlp()
    opt, twin_opt = build(kind, model, ascent_steps=2), build(kind, twin, ascent_steps=2)
    for b in data[:3]:
        train_step(kind, model, opt, b)
        train_step(kind, twin, twin_opt, b)
    saved_w, saved_state = weights(model), clone_state(opt)
    calls = [0]
    with pytest.warns(RuntimeWarning, match="non-finite gradient.*step skipped"):
        opt.step(sam_closure(model, opt, data[3], poison_call=poison_call, calls=calls))
    assert calls[0] == poison_call + 1  # no further pass after the bad one
    assert opt.skipped_steps == 1
    assert_weights_equal(model, saved_w)
    assert_state_equal(opt, saved_state)
    for b in data[4:]:
        train_step(kind, model, opt, b)
        train_step(kind, twin, twin_opt, b)
    assert_weights_equal(model, weights(twin))


def test_non_finite_loss_in_first_pass_skips_step():
    model = mlp()
    opt = build("sgd", model)
    saved = weights(model)
    x, y = batches(1)[0]
    x = x.clone()
    x[0, 0] = INF
    with pytest.warns(RuntimeWarning):
        opt.step(sam_closure(model, opt, (x, y)))
    assert_weights_equal(model, saved)
    assert opt.skipped_steps == 1 and len(opt.state) == 0


@pytest.mark.parametrize("bad_call", [0, 1], ids=["first", "second"])
def test_esam_non_finite_skips_step_loss_criterion(bad_call):
    data = batches(5)
    model = mlp()
    opt = ESAM(
        model.parameters(),
        SGD,
        rho=0.1,
        beta=0.6,
        gamma=0.5,
        sds_criterion="loss",
        lr=0.1,
        momentum=0.9,
    )
    for b in data[:3]:
        opt.step(esam_closure(model, b))
    saved_w, saved_state = weights(model), clone_state(opt)
    calls = [0]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(esam_closure(model, data[3], poison_call=bad_call, calls=calls))
    assert calls[0] == 1 + (bad_call == 1)
    assert opt.skipped_steps == 1
    assert_weights_equal(model, saved_w)
    assert_state_equal(opt, saved_state)
    assert all(p.requires_grad for p in model.parameters())
    opt.step(esam_closure(model, data[4]))  # and a normal step afterwards
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("bad_call", [0, 2], ids=["first", "second"])
def test_esam_non_finite_skips_step_sharpness_criterion(bad_call):
    """BUG (esam.py, ESAM.step: `perturbed = None` ... `self.sds_select(clean, perturbed)`):
    with sds_criterion="sharpness" and gamma < 1, a non-finite first-pass gradient makes
    first_step() return False, the perturbed losses are not computed, and ``sds_select(clean,
    None)`` raises ValueError instead of the step being skipped."""
    data = batches(5)
    model = mlp()
    opt = ESAM(model.parameters(), SGD, rho=0.1, beta=0.6, gamma=0.5, lr=0.1, momentum=0.9)
    for b in data[:3]:
        opt.step(esam_closure(model, b))
    saved_w, saved_state = weights(model), clone_state(opt)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(esam_closure(model, data[3], poison_call=bad_call))
    assert opt.skipped_steps == 1
    assert_weights_equal(model, saved_w)
    assert_state_equal(opt, saved_state)
    assert all(p.requires_grad for p in model.parameters())


def test_failed_first_step_does_not_skip_the_next_healthy_step():
    """BUG (SAM._ascend sets _failed_pass; only second_step clears it): ``first_step`` returns
    False on a non-finite gradient and records the failure in ``_failed_pass``, which only
    ``second_step`` clears. A loop that reacts to the False by dropping the batch (``if not
    opt.first_step(): continue``) leaves the flag set, and the NEXT, healthy step is then
    skipped by ``second_step`` (warning: "non-finite gradient in the first pass"). A new
    ``first_step`` should start a new step (or the contract must say that ``second_step`` is
    mandatory after a failed ``first_step``)."""
    w = torch.ones(3, dtype=F64, requires_grad=True)
    opt = SAM([w], SGD, rho=0.1, lr=0.1)
    w.grad = torch.tensor([NAN, 1.0, 1.0], dtype=F64)
    assert opt.first_step(zero_grad=True) is False  # the user drops this batch
    w.grad = torch.tensor([1.0, 2.0, 2.0], dtype=F64)
    assert opt.first_step(zero_grad=True) is True
    w.grad = torch.tensor([1.0, 2.0, 2.0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.second_step() is True
    assert torch.equal(w.detach(), torch.tensor([0.9, 0.8, 0.8], dtype=F64))


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_fail_step_restores_and_skips(kind):
    """``fail_step`` (e.g. another replica saw a non-finite gradient) undoes the perturbation and
    makes ``second_step`` skip the base step."""
    data = batches(3)
    model = mlp()
    opt = build(kind, model)
    for b in data[:2]:
        train_step(kind, model, opt, b)
    saved_w, saved_state = weights(model), clone_state(opt)
    x, y = data[2]
    F.cross_entropy(model(x), y).backward()
    assert opt.first_step(zero_grad=True)
    opt.fail_step("replica")
    assert_weights_equal(model, saved_w)
    assert opt.failed_pass == "replica"
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="step skipped"):
        assert opt.second_step(zero_grad=True) is False
    assert_weights_equal(model, saved_w)
    assert_state_equal(opt, saved_state)
    assert opt.skipped_steps == 1 and opt.failed_pass is None


# ---------------------------------------------------------------- gradients appearing / vanishing


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
def test_restores_exactly_the_perturbed_tensors(foreach, adaptive):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen, dtype=F64).requires_grad_() for s in [(3,), (2, 2), (5,)]]
    lr = 0.1
    opt = SAM(
        [{"params": ps[:1]}, {"params": ps[1:]}],
        SGD,
        rho=0.2,
        lr=lr,
        foreach=foreach,
        adaptive=adaptive,
    )
    # (tensors with a grad in the first pass, tensors with a grad in the second pass)
    schedule = [
        ({0, 1}, {1, 2}),
        ({2}, {0}),
        ({0, 1, 2}, set()),
        ({1}, {0, 1, 2}),
        ({0, 2}, {0, 2}),
    ]
    for first, second in schedule:
        saved = [p.detach().clone() for p in ps]
        for i, p in enumerate(ps):
            p.grad = torch.randn(p.shape, generator=gen, dtype=F64) if i in first else None
        assert opt.first_step(zero_grad=True)
        for i, (p, s) in enumerate(zip(ps, saved)):
            assert torch.equal(p, s) is (i not in first)  # only tensors with a grad move
        g2 = {i: torch.randn(ps[i].shape, generator=gen, dtype=F64) for i in second}
        for i, p in enumerate(ps):
            p.grad = g2[i].clone() if i in second else None
        assert opt.second_step(zero_grad=True)
        for i, (p, s) in enumerate(zip(ps, saved)):
            expected = s.clone().add_(g2[i], alpha=-lr) if i in second else s
            assert torch.equal(p, expected), (first, second, i)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_first_step_without_any_gradient_is_a_no_op(foreach):
    """BUG (SAM._ascend -> _base._save_clean -> _functional.copy_): when no parameter has a
    gradient in the first pass, ``first_step()`` with the foreach path (the default) calls
    ``torch._foreach_copy_([], [])``, which raises "Tensor list must have at least one tensor".
    It must perturb nothing and return True (ESAM hits this whenever SWP drops every tensor)."""
    ps = [
        torch.ones(3, dtype=F64, requires_grad=True),
        torch.ones(2, dtype=F64, requires_grad=True),
    ]
    opt = SAM(ps, SGD, rho=0.1, lr=0.1, foreach=foreach)
    assert opt.first_step() is True
    assert all(torch.equal(p, torch.ones_like(p)) for p in ps)
    ps[1].grad = torch.tensor([1.0, -2.0], dtype=F64)
    assert opt.second_step() is True
    assert torch.equal(ps[0].detach(), torch.ones(3, dtype=F64))
    assert torch.equal(ps[1].detach(), torch.tensor([0.9, 1.2], dtype=F64))


def test_restores_exactly_with_grads_vanishing_in_ascent_pass():
    gen = torch.Generator().manual_seed(1)
    ps = [torch.randn(4, generator=gen, dtype=F64).requires_grad_() for _ in range(3)]
    opt = SAM(ps, SGD, rho=0.2, lr=0.1, ascent_steps=2)
    saved = [p.detach().clone() for p in ps]
    ps[0].grad, ps[1].grad, ps[2].grad = torch.ones(4, dtype=F64), torch.ones(4, dtype=F64), None
    opt.first_step(zero_grad=True)
    ps[1].grad, ps[2].grad = (
        torch.ones(4, dtype=F64),
        torch.ones(4, dtype=F64),
    )  # 0 vanishes, 2 appears
    assert opt.ascent_step(zero_grad=True)
    assert torch.equal(ps[2], saved[2])  # not part of the perturbation
    opt.unperturb()
    for p, s in zip(ps, saved):
        assert torch.equal(p, s)


# ---------------------------------------------------------------- in-place restore


@pytest.mark.parametrize("kind", ["sgd", "adamw", "esam"])
def test_params_keep_their_storage(kind):
    model = mlp()
    opt = build(kind, model, **({} if kind == "esam" else {"ascent_steps": 2}))
    ptrs = [p.data_ptr() for p in model.parameters()]
    data = batches(4)
    seen = []
    for i, b in enumerate(data):
        if kind == "esam":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step(esam_closure(model, b, poison_call=2 if i == 2 else None))
        else:
            x, y = b

            def closure(x=x, y=y, poison=i == 2):
                opt.zero_grad()
                seen.append([p.data_ptr() for p in model.parameters()])
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                if poison:
                    model[0].bias.grad.fill_(NAN)
                return loss

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step(closure)
        assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(s == ptrs for s in seen)
    assert opt.skipped_steps == 1


# ---------------------------------------------------------------- checkpoint contents


BASE_KEYS = {
    "sgd": {"momentum_buffer"},
    "adamw": {"exp_avg", "exp_avg_sq", "step"},
    "esam": {"momentum_buffer"},
}


def _tensors(obj, path=()):
    if torch.is_tensor(obj):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, path + (k,))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, path + (i,))


@pytest.mark.parametrize("mid_step", [False, True])
@pytest.mark.parametrize("kind", ["sgd", "adamw", "esam"])
def test_state_dict_holds_no_parameter_copies(kind, mid_step):
    model = mlp()
    opt = build(kind, model)
    for b in batches(3):
        train_step(kind, model, opt, b)
    if mid_step:  # perturbed: the clean weights are held somewhere, but not in the state
        x, y = batches(1, seed=5)[0]
        F.cross_entropy(model(x), y).backward()
        opt.first_step()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "samkit"}
    expected_samkit = {"skipped_steps"} | ({"esam_generator"} if kind == "esam" else set())
    assert set(sd["samkit"]) == expected_samkit
    assert set(sd["state"]) == set(range(len(list(model.parameters()))))
    for s in sd["state"].values():
        assert set(s) == BASE_KEYS[kind]
    param_shapes = {tuple(p.shape) for p in model.parameters()}
    for path, t in _tensors(sd):
        if path[0] == "state" and path[2] in BASE_KEYS[kind]:
            continue
        assert tuple(t.shape) not in param_shapes, path
    # the SAM keys live in the param groups, the base optimizer's own keys too
    for g in sd["param_groups"]:
        assert {"rho", "adaptive", "adaptive_eta", "lr"} <= set(g)
    base_sd = opt.base_optimizer.state_dict()
    assert base_sd["state"].keys() == sd["state"].keys()


# ---------------------------------------------------------------- exact resume


def _save(model, opt):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kind", ["sgd", "adamw", "esam"])
def test_state_dict_round_trip_resumes_bit_identically(kind):
    data = batches(8)
    k = 4
    model = mlp(seed=0)
    seed_kw = {"seed": 7} if kind == "esam" else {}
    opt = build(kind, model, **seed_kw)
    for i, b in enumerate(data[:k]):
        if i == 1:  # one skipped step before the checkpoint: the counter must survive
            with pytest.warns(RuntimeWarning):
                if kind == "esam":
                    opt.step(esam_closure(model, b, poison_call=2))  # second pass
                else:
                    opt.step(sam_closure(model, opt, b, poison_call=0))
        else:
            train_step(kind, model, opt, b)
    checkpoint = _save(model, opt)
    for b in data[k:]:
        train_step(kind, model, opt, b)

    # fresh model (different init) and optimizer (different ESAM seed), restored from the checkpoint
    fresh = mlp(seed=123)
    fresh_opt = build(kind, fresh, **({"seed": 99} if kind == "esam" else {}))
    fresh.load_state_dict(checkpoint["model"])
    fresh_opt.load_state_dict(checkpoint["opt"])
    assert fresh_opt.skipped_steps == 1
    assert fresh_opt.param_groups is fresh_opt.base_optimizer.param_groups
    assert fresh_opt.state is fresh_opt.base_optimizer.state
    for b in data[k:]:
        train_step(kind, fresh, fresh_opt, b)
    assert_weights_equal(fresh, weights(model))

    # control: without the optimizer state (or, for ESAM, without the generator) the runs differ
    control = mlp(seed=123)
    control.load_state_dict(checkpoint["model"])
    control_opt = build(kind, control, **({"seed": 99} if kind == "esam" else {}))
    if kind == "esam":
        partial = dict(checkpoint["opt"], samkit={"skipped_steps": 1})
        control_opt.load_state_dict(partial)
    for b in data[k:]:
        train_step(kind, control, control_opt, b)
    assert not all(torch.equal(a, b) for a, b in zip(control.parameters(), model.parameters()))


def test_load_state_dict_restores_sam_group_options():
    model = mlp()
    opt = SAM(model.parameters(), SGD, rho=0.3, adaptive=True, lr=0.1, momentum=0.9)
    train_step("sgd", model, opt, batches(1)[0])
    fresh = SAM(model.parameters(), SGD, rho=0.05, lr=0.5, momentum=0.9)
    fresh.load_state_dict(_save(model, opt)["opt"])
    assert [(g["rho"], g["adaptive"], g["lr"]) for g in fresh.param_groups] == [(0.3, True, 0.1)]
