"""Exact tests of ``SharpnessAwareStep``: every behaviour is compared with a manual reference.

The references are written here either with plain autograd around ``first_step`` /
``second_step`` (same arithmetic as the helper, so ``torch.equal``), or with plain tensor math
(``e = rho g / (||g|| + eps)``, ``torch.autograd.grad``, a plain ``torch.optim.SGD`` step), compared
in float64 at 1e-12. AMP fp16 is compared with its float32 reference at fp16 tolerance.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samkit.optim import ESAM, SAM
from samkit.train import SharpnessAwareStep

F64 = torch.float64
F32 = torch.float32
RHO = 0.05
LR = 0.1
MOMENTUM = 0.9


# -- helpers ------------------------------------------------------------------------------------


def per_sample_ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def mlp(seed=0, dtype=F64, d_in=5, hidden=8, d_out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(dtype)


def batch(seed, n, d_in=5, classes=3, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def make_sam(model, rho=RHO, **kwargs):
    return SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=LR, momentum=MOMENTUM, **kwargs)


def make_sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_equal_list(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e), (a - e).abs().max()


def assert_close_list(actual, expected, rtol=1e-12, atol=1e-14):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def flat_norm(tensors):
    return torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in tensors]))


def opt_state(opt):
    """Deep copy of the (base) optimizer's per-parameter state, for exact comparison."""
    return {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state_dict()["state"].items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for n in a[k]:
            assert torch.equal(a[k][n], b[k][n])


def ref_sam_step(model, opt, x, y, loss_fn=per_sample_ce):
    """The davda54/sam two-pass loop, by hand."""
    loss_fn(model(x), y).mean().backward()
    opt.first_step(zero_grad=True)
    loss_fn(model(x), y).mean().backward()
    return opt.second_step(zero_grad=True)


def sam_grad(model, x, y, rho=RHO, eps=1e-12):
    """SAM gradient ``grad L(w + e)`` with ``e = rho g / (||g|| + eps)``, by plain tensor math."""
    ps = list(model.parameters())
    g = torch.autograd.grad(per_sample_ce(model(x), y).mean(), ps)
    coef = rho / (flat_norm(g).item() + eps)
    clean = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for p, gi in zip(ps, g):
            p.add_(gi * coef)
    g_sam = torch.autograd.grad(per_sample_ce(model(x), y).mean(), ps)
    with torch.no_grad():
        for p, c in zip(ps, clean):
            p.copy_(c)
    return g_sam


def apply_grads(model, base_opt, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    base_opt.step()
    base_opt.zero_grad(set_to_none=True)


class Poison(nn.Module):
    """Identity, except that the call with index ``poison_at`` (counted from ``reset()``)
    multiplies by inf: a non-finite forward in a chosen pass of a step."""

    def __init__(self):
        super().__init__()
        self.calls, self.poison_at = 0, None

    def reset(self, poison_at=None):
        self.calls, self.poison_at = 0, poison_at

    def forward(self, x):
        i, self.calls = self.calls, self.calls + 1
        return x * math.inf if i == self.poison_at else x


def poison_mlp(seed=0, dtype=F64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), Poison(), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


class ForwardLog:
    """Records the batch size of every forward of ``module``."""

    def __init__(self, module):
        self.sizes = []
        module.register_forward_pre_hook(lambda m, args: self.sizes.append(args[0].shape[0]))


# -- 1. BatchNorm -------------------------------------------------------------------------------


def bn_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(F64)


def buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def restore_buffers(model, saved):
    for k, v in model.named_buffers():
        v.copy_(saved[k])


def ref_bn_step(model, opt, x, y, keep, second_eval=False):
    """Both passes in train mode (batch statistics); running buffers kept only from ``keep``."""
    saved = buffers(model)
    per_sample_ce(model(x), y).mean().backward()
    if keep == "second":
        restore_buffers(model, saved)
    opt.first_step(zero_grad=True)
    saved = buffers(model)
    if second_eval:
        model.eval()
    per_sample_ce(model(x), y).mean().backward()
    model.train()
    if keep == "first":
        restore_buffers(model, saved)
    opt.second_step(zero_grad=True)


def test_bn_first_running_stats_equal_one_forward_of_the_first_pass():
    model = bn_model()
    fwd = copy.deepcopy(model)
    x, y = batch(1, 8)
    step = SharpnessAwareStep(model, make_sam(model), per_sample_ce)
    assert step.bn_stats == "first"
    step(x, y)
    with torch.no_grad():
        fwd(x)  # ONE train-mode forward at the original weights
    for name, buf in model.named_buffers():
        assert torch.equal(buf, dict(fwd.named_buffers())[name]), name
    assert model[1].num_batches_tracked.item() == 1
    assert model[1].track_running_stats  # restored after the frozen pass


@pytest.mark.parametrize("bn_stats", ["first", "second", "both"])
def test_bn_stats_and_weights_equal_manual_reference(bn_stats):
    model = bn_model()
    ref = copy.deepcopy(model)
    step = SharpnessAwareStep(model, make_sam(model), per_sample_ce, bn_stats=bn_stats)
    ref_opt = make_sam(ref)
    for t in range(3):
        x, y = batch(10 + t, 8)
        assert step(x, y).took_step
        ref_bn_step(ref, ref_opt, x, y, keep=bn_stats)
        assert_equal_list(weights(model), weights(ref))
        for name, buf in model.named_buffers():
            assert torch.equal(buf, dict(ref.named_buffers())[name]), (bn_stats, name)
    passes = 2 if bn_stats == "both" else 1
    assert model[1].num_batches_tracked.item() == 3 * passes
    assert model[1].track_running_stats


def test_bn_second_and_first_stats_differ_and_eval_second_pass_differs():
    """The comparisons above are discriminating: w + e changes the statistics, and a second pass
    that normalised with the running statistics (eval mode) would give other weights."""
    x, y = batch(1, 8)
    models = {}
    for bn_stats in ("first", "second"):
        model = bn_model()
        SharpnessAwareStep(model, make_sam(model), per_sample_ce, bn_stats=bn_stats)(x, y)
        models[bn_stats] = model
    assert not torch.equal(models["first"][1].running_mean, models["second"][1].running_mean)
    ref = bn_model()
    ref_bn_step(ref, make_sam(ref), x, y, keep="first", second_eval=True)
    assert max_diff(weights(ref), weights(models["first"])) > 1e-6


def test_bn_track_running_stats_restored_after_an_exception():
    model = bn_model()
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in the second pass")
        return per_sample_ce(out, y)

    step = SharpnessAwareStep(model, make_sam(model), loss_fn)
    with pytest.raises(RuntimeError, match="boom"):
        step(*batch(1, 8))
    assert model[1].track_running_stats


def test_exception_in_second_pass_leaves_clean_weights():
    """BUG (src/samkit/train/step.py, _sam_chunk): ``opt.unperturb()`` is not in a ``finally``.
    If the second pass raises (e.g. a CUDA OOM that the training loop catches to skip the batch),
    the model is left at ``w + e``; the next step then saves ``w + e`` as the clean weights."""
    model = mlp()
    w0 = weights(model)
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated out of memory in the second pass")
        return per_sample_ce(out, y)

    step = SharpnessAwareStep(model, make_sam(model), loss_fn)
    with pytest.raises(RuntimeError, match="simulated"):
        step(*batch(1, 8))
    assert_equal_list(weights(model), w0)


@pytest.mark.parametrize("which", ["ascent_steps", "esam_sharpness"])
def test_bn_both_counts_only_the_first_and_second_pass(which):
    """BUG (src/samkit/train/step.py, _pass): the module docstring says passes other than the
    selected ones "normalise with batch statistics but do not touch the running buffers", but with
    ``bn_stats="both"`` the extra ascent forwards (SAM ``ascent_steps > 1``, ESAM's no-grad forward
    at ``w + e`` for ``sds_criterion="sharpness"``) also update running_mean/var and
    num_batches_tracked (``freeze_bn`` is False for kind "ascent" when bn_stats == "both")."""
    model = bn_model()
    if which == "ascent_steps":
        opt = make_sam(model, ascent_steps=2)
    else:
        opt = ESAM(model.parameters(), torch.optim.SGD, rho=RHO, beta=1.0, gamma=0.5, lr=LR)
    step = SharpnessAwareStep(model, opt, per_sample_ce, bn_stats="both")
    step(*batch(1, 8))
    assert model[1].num_batches_tracked.item() == 2


# -- 2. RNG replay ------------------------------------------------------------------------------


def dropout_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3)).to(F64)


def record_masks(model):
    masks = []
    model[1].register_forward_hook(lambda m, i, out: masks.append((out != 0).clone()))
    return masks


@pytest.mark.parametrize("replay", [True, False])
def test_dropout_masks_replayed_and_weights_equal_manual_reference(replay):
    model = dropout_model()
    ref = copy.deepcopy(model)
    masks = record_masks(model)
    step = SharpnessAwareStep(model, make_sam(model), per_sample_ce, replay_rng=replay)
    ref_opt = make_sam(ref)
    for t in range(3):
        x, y = batch(20 + t, 8)
        torch.manual_seed(100 + t)
        assert step(x, y).took_step
        rng_after = torch.get_rng_state()
        first, second = masks[-2], masks[-1]
        assert not first.all()  # dropout really dropped something
        if replay:
            assert torch.equal(first, second)
        else:
            assert not torch.equal(first, second)

        torch.manual_seed(100 + t)
        state = torch.get_rng_state()
        per_sample_ce(ref(x), y).mean().backward()
        ref_opt.first_step(zero_grad=True)
        if replay:
            torch.set_rng_state(state)
        per_sample_ce(ref(x), y).mean().backward()
        ref_opt.second_step(zero_grad=True)
        assert_equal_list(weights(model), weights(ref))
        assert torch.equal(torch.get_rng_state(), rng_after)
    assert len(masks) == 6


def test_rng_replayed_in_every_ascent_pass():
    model = dropout_model()
    masks = record_masks(model)
    step = SharpnessAwareStep(model, make_sam(model, ascent_steps=3), per_sample_ce)
    step(*batch(1, 8))
    assert len(masks) == 4
    assert all(torch.equal(masks[0], m) for m in masks[1:])


# -- 3. AMP -------------------------------------------------------------------------------------


def test_bf16_autocast_and_manual_reference():
    model = mlp(dtype=F32)
    ref = copy.deepcopy(model)
    dtypes = []
    model[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    step = SharpnessAwareStep(model, make_sam(model), per_sample_ce, amp="bf16")
    assert step.grad_scaler is None
    ref_opt = make_sam(ref)
    for t in range(3):
        x, y = batch(30 + t, 8, dtype=F32)
        out = step(x, y)
        assert out.took_step
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = per_sample_ce(ref(x), y).mean()
        loss.backward()
        ref_opt.first_step(zero_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss2 = per_sample_ce(ref(x), y).mean()
        loss2.backward()
        ref_opt.second_step(zero_grad=True)
        assert torch.equal(out.loss, loss.detach())
        assert_equal_list(weights(model), weights(ref))
    assert dtypes == [torch.bfloat16] * 6


def perturbation_recorder(model):
    """Weights seen by every forward (copies), to read off the perturbation of the second pass."""
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(weights(m)))
    return seen


def fp32_reference_step(model, opt, x, y):
    w0 = weights(model)
    ref_sam_step(model, opt, x, y)
    return [a - b for a, b in zip(weights(model), w0)]


def assert_fp16_close(actual, expected, rel=2e-2):
    """Whole-vector relative error, as appropriate for fp16 autocast (~1e-3 per op)."""
    err = flat_norm([a - e for a, e in zip(actual, expected)]).item()
    assert err <= rel * flat_norm(expected).item(), (err, flat_norm(expected).item())


def test_fp16_step_matches_fp32_and_perturbation_norm_is_rho():
    model = mlp(seed=3, dtype=F32)
    ref = copy.deepcopy(model)
    dtypes = []
    model[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    seen = perturbation_recorder(model)
    step = SharpnessAwareStep(model, make_sam(model), per_sample_ce, amp="fp16")
    ref_opt = make_sam(ref)
    for t in range(3):
        x, y = batch(40 + t, 16, dtype=F32)
        w0 = weights(model)
        out = step(x, y)
        assert out.took_step
        e = [a - b for a, b in zip(seen[-1], w0)]
        assert flat_norm(e).item() == pytest.approx(RHO, rel=1e-4)
        # the reported norm is the unscaled SAM gradient's (65536x larger if it were scaled)
        ref_norm = flat_norm(sam_grad(ref, x, y)).item()
        assert out.grad_norm.item() == pytest.approx(ref_norm, rel=2e-2)
        delta = [a - b for a, b in zip(weights(model), w0)]
        assert_fp16_close(delta, fp32_reference_step(ref, ref_opt, x, y))
        # re-sync so that fp16 error does not compound over the steps
        with torch.no_grad():
            for p, q in zip(ref.parameters(), model.parameters()):
                p.copy_(q)
    assert dtypes == [torch.float16] * 6
    assert step.grad_scaler.get_scale() == 65536.0


def test_fp16_perturbation_is_computed_from_unscaled_gradients():
    """With eps = ||g||, e = rho g / (||g|| + eps) has norm rho / 2 from the true gradient, but
    ~rho from a gradient still multiplied by the loss scale (65536): the test sees the scaling."""
    model = mlp(seed=4, dtype=F32)
    x, y = batch(50, 16, dtype=F32)
    g = torch.autograd.grad(per_sample_ce(model(x), y).mean(), list(model.parameters()))
    eps = flat_norm(g).item()
    e_ref = [RHO * gi / (eps + eps) for gi in g]
    seen = perturbation_recorder(model)
    w0 = weights(model)
    step = SharpnessAwareStep(model, make_sam(model, eps=eps), per_sample_ce, amp="fp16")
    assert step(x, y).took_step
    e = [a - b for a, b in zip(seen[1], w0)]
    assert flat_norm(e).item() == pytest.approx(RHO / 2, rel=5e-3)
    assert_fp16_close(e, e_ref, rel=1e-2)


def fp16_poison_setup():
    model = poison_mlp(seed=5, dtype=F32)
    step = SharpnessAwareStep(model, make_sam(model), per_sample_ce, amp="fp16")
    return model, model[1], step


@pytest.mark.parametrize("poison_at", [0, 1], ids=["first_pass", "second_pass"])
def test_fp16_overflow_skips_step_and_backs_off(poison_at):
    model, poison, step = fp16_poison_setup()
    opt = step.optimizer
    x, y = batch(60, 8, dtype=F32)
    assert step(x, y).took_step  # momentum state exists now
    scale = step.grad_scaler.get_scale()
    w0, s0 = weights(model), opt_state(opt)

    poison.reset(poison_at)
    with pytest.warns(RuntimeWarning, match=["first", "second"][poison_at]):
        out = step(*batch(61, 8, dtype=F32))
    assert poison.calls == 2
    assert out.took_step is False
    assert opt.skipped_steps == 1 and step.skipped_steps == 1
    assert_equal_list(weights(model), w0)
    assert_same_state(opt_state(opt), s0)
    assert all(p.grad is None for p in model.parameters())
    assert step.grad_scaler.get_scale() == scale * 0.5

    # normal steps continue, with the reduced scale, and match the fp32 reference
    poison.reset(None)
    ref = copy.deepcopy(model)
    ref_opt = make_sam(ref)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch aliases state tensors
    x2, y2 = batch(62, 8, dtype=F32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = step(x2, y2)
    assert out.took_step is True and opt.skipped_steps == 1
    delta = [a - b for a, b in zip(weights(model), w0)]
    assert_fp16_close(delta, fp32_reference_step(ref, ref_opt, x2, y2))
    assert step.grad_scaler.get_scale() == scale * 0.5


def test_fp16_first_pass_overflow_resets_growth_tracker_like_second_pass_overflow():
    """BUG (src/samkit/train/step.py, _apply_sam): after a FIRST-pass overflow the scaler is backed
    off by hand with ``scaler.update(new_scale)``, which does not reset GradScaler's growth tracker
    (a real overflow, as in the second pass, resets it to 0). The scale then grows back after fewer
    than ``growth_interval`` clean steps: here, 1 clean step instead of 3."""
    results = {}
    for poison_at in (1, 0):  # second pass (reference behaviour), then first pass
        model, poison, step = fp16_poison_setup()
        step.grad_scaler = torch.amp.GradScaler("cpu", growth_interval=3)
        for t in range(2):  # growth tracker -> 2
            assert step(*batch(70 + t, 8, dtype=F32)).took_step
        poison.reset(poison_at)
        with pytest.warns(RuntimeWarning):
            assert step(*batch(72, 8, dtype=F32)).took_step is False
        after_skip = step.grad_scaler.state_dict()
        poison.reset(None)
        assert step(*batch(73, 8, dtype=F32)).took_step
        results[poison_at] = (after_skip, step.grad_scaler.get_scale())
    assert results[1][0]["_growth_tracker"] == 0
    assert results[1][1] == 32768.0
    assert results[0][0] == results[1][0]
    assert results[0][1] == 32768.0


def test_fp16_accumulation_and_m_sharpness_match_fp32():
    """The first-pass unscale must not touch the accumulated (still scaled) SAM gradient."""
    model = mlp(seed=19, dtype=F32)
    fp32 = copy.deepcopy(model)
    acc16 = copy.deepcopy(model)
    m16 = SharpnessAwareStep(model, make_sam(model), per_sample_ce, m=4, amp="fp16")
    a16 = SharpnessAwareStep(
        acc16, make_sam(acc16), per_sample_ce, accumulation_steps=2, amp="fp16"
    )
    ref = SharpnessAwareStep(fp32, make_sam(fp32), per_sample_ce, m=4)
    w0 = weights(model)
    x, y = batch(55, 8, dtype=F32)
    assert m16(x, y).took_step and ref(x, y).took_step
    assert a16(x[:4], y[:4]).took_step is None
    assert a16(x[4:], y[4:]).took_step is True
    expected = [a - b for a, b in zip(weights(fp32), w0)]
    assert_fp16_close([a - b for a, b in zip(weights(model), w0)], expected)
    assert_fp16_close([a - b for a, b in zip(weights(acc16), w0)], expected)


def test_fp16_overflow_in_an_early_micro_batch_skips_the_accumulated_step():
    model = poison_mlp(seed=20, dtype=F32)
    step = SharpnessAwareStep(
        model, make_sam(model), per_sample_ce, accumulation_steps=2, amp="fp16"
    )
    w0 = weights(model)
    model[1].reset(poison_at=0)  # first pass of micro-batch 1
    assert step(*batch(56, 4, dtype=F32)).took_step is None
    with pytest.warns(RuntimeWarning, match="first"):
        assert step(*batch(57, 4, dtype=F32)).took_step is False
    assert_equal_list(weights(model), w0)
    assert step.grad_scaler.get_scale() == 32768.0 and step.skipped_steps == 1
    assert step.optimizer.state_dict()["state"] == {}


def test_fp16_plain_sgd_matches_fp32():
    model = mlp(seed=21, dtype=F32)
    ref = copy.deepcopy(model)
    step = SharpnessAwareStep(model, make_sgd(model), per_sample_ce, amp="fp16")
    ref_opt = make_sgd(ref)
    for t in range(2):
        x, y = batch(58 + t, 8, dtype=F32)
        w0 = weights(model)
        out = step(x, y)
        per_sample_ce(ref(x), y).mean().backward()
        norm = flat_norm([p.grad for p in ref.parameters()]).item()
        ref_opt.step()
        ref_opt.zero_grad()
        assert out.took_step is True
        assert out.grad_norm.item() == pytest.approx(norm, rel=2e-2)  # unscaled
        expected = [a - b for a, b in zip(weights(ref), w0)]
        assert_fp16_close([a - b for a, b in zip(weights(model), w0)], expected)
        with torch.no_grad():
            for p, q in zip(ref.parameters(), model.parameters()):
                p.copy_(q)


# -- 4. gradient clipping -----------------------------------------------------------------------


@pytest.mark.parametrize("max_grad_norm", [0.05, 1e3])
def test_clipping_applies_to_the_sam_gradient(max_grad_norm):
    model = mlp(seed=6)
    ref = copy.deepcopy(model)
    step = SharpnessAwareStep(model, make_sam(model), per_sample_ce, max_grad_norm=max_grad_norm)
    ref_opt = make_sam(ref)
    clipped = 0
    for t in range(3):
        x, y = batch(80 + t, 8)
        out = step(x, y)
        assert out.took_step
        per_sample_ce(ref(x), y).mean().backward()
        ref_opt.first_step(zero_grad=True)
        per_sample_ce(ref(x), y).mean().backward()
        total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_grad_norm)
        ref_opt.second_step(zero_grad=True)
        clipped += total.item() > max_grad_norm
        torch.testing.assert_close(out.grad_norm.to(F64), total, rtol=1e-13, atol=0)  # pre-clip
        assert_close_list(weights(model), weights(ref))
    assert clipped == (3 if max_grad_norm < 1 else 0)


# -- 5. gradient accumulation -------------------------------------------------------------------


def test_accumulation_equals_m_sharpness_and_manual_reference():
    k, mb = 3, 4
    model = mlp(seed=7)
    m_model, ref = copy.deepcopy(model), copy.deepcopy(model)
    step = SharpnessAwareStep(model, make_sam(model), per_sample_ce, accumulation_steps=k)
    m_step = SharpnessAwareStep(m_model, make_sam(m_model), per_sample_ce, m=mb)
    ref_opt = make_sgd(ref)
    for cycle in range(2):
        x, y = batch(90 + cycle, k * mb)
        w0 = weights(model)
        for i in range(k):
            xi, yi = x[i * mb : (i + 1) * mb], y[i * mb : (i + 1) * mb]
            expected_out = m_model(xi).detach()  # m_model is still at w0
            out = step(xi, yi)
            torch.testing.assert_close(out.outputs, expected_out, rtol=1e-14, atol=1e-14)
            torch.testing.assert_close(
                out.loss, per_sample_ce(expected_out, yi).mean(), rtol=1e-14, atol=1e-14
            )
            if i < k - 1:
                assert out.took_step is None and out.grad_norm is None
                assert_equal_list(weights(model), w0)
            else:
                assert out.took_step is True and out.grad_norm is not None
        assert m_step(x, y).took_step
        grads = [
            sam_grad(ref, x[i * mb : (i + 1) * mb], y[i * mb : (i + 1) * mb]) for i in range(k)
        ]
        apply_grads(ref, ref_opt, [sum(gs) / k for gs in zip(*grads)])
        assert_close_list(weights(model), weights(m_model), rtol=1e-14, atol=1e-15)
        assert_close_list(weights(model), weights(ref))


def test_resume_between_micro_batches_of_an_accumulation_continues_exactly():
    # Saved after micro-batch 1 of 3 (BatchNorm included), loaded into a fresh model, optimizer
    # and step: the run ends bit-identical to one never interrupted.
    k, mb = 3, 4
    xs = [batch(120 + i, mb) for i in range(2 * k)]

    def build():
        model = bn_model(seed=11)
        opt = make_sam(model)
        return model, opt, SharpnessAwareStep(model, opt, per_sample_ce, accumulation_steps=k)

    model, opt, step = build()
    for x, y in xs:
        step(x, y)
    expected = {**dict(model.named_parameters()), **buffers(model)}

    model, opt, step = build()
    for x, y in xs[:4]:  # one whole step, then one micro-batch into the next
        step(x, y)
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "step": step.state_dict()}
    )
    assert "accumulated" in saved["step"]
    model, opt, step = build()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    step.load_state_dict(saved["step"])
    for x, y in xs[4:]:
        step(x, y)
    actual = {**dict(model.named_parameters()), **buffers(model)}
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


def test_step_state_without_the_accumulated_gradients_is_refused():
    model = mlp(seed=12)
    step = SharpnessAwareStep(model, make_sam(model), per_sample_ce, accumulation_steps=2)
    with pytest.raises(ValueError, match="does not hold their gradient sum"):
        step.load_state_dict({"micro": 1})


# -- 6. m-sharpness -----------------------------------------------------------------------------


def test_m_equal_to_batch_is_plain_sam():
    model = mlp(seed=8)
    plain = copy.deepcopy(model)
    step = SharpnessAwareStep(model, make_sam(model), per_sample_ce, m=8)
    plain_step = SharpnessAwareStep(plain, make_sam(plain), per_sample_ce)
    ref = copy.deepcopy(model)
    ref_opt = make_sam(ref)
    for t in range(3):
        x, y = batch(100 + t, 8)
        a, b = step(x, y), plain_step(x, y)
        ref_sam_step(ref, ref_opt, x, y)
        assert torch.equal(a.loss, b.loss) and torch.equal(a.grad_norm, b.grad_norm)
        assert_equal_list(weights(model), weights(plain))
        assert_equal_list(weights(model), weights(ref))


@pytest.mark.parametrize(("batch_size", "m"), [(8, 4), (10, 4), (10, 3)])
def test_m_sharpness_equals_size_weighted_average_of_chunk_sam_gradients(batch_size, m):
    model = mlp(seed=9)
    ref, glob = copy.deepcopy(model), copy.deepcopy(model)
    step = SharpnessAwareStep(model, make_sam(model), per_sample_ce, m=m)
    ref_opt, glob_opt = make_sgd(ref), make_sgd(glob)
    for t in range(2):
        x, y = batch(110 + t, batch_size)
        expected_out = ref(x).detach()
        out = step(x, y)
        assert out.took_step
        torch.testing.assert_close(out.outputs, expected_out, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(
            out.loss, per_sample_ce(expected_out, y).mean(), rtol=1e-13, atol=1e-14
        )
        starts = range(0, batch_size, m)
        grads, sizes = [], []
        for s in starts:  # each chunk perturbed from its OWN gradient at the ORIGINAL weights
            grads.append(sam_grad(ref, x[s : s + m], y[s : s + m]))
            sizes.append(min(m, batch_size - s))
        assert sum(sizes) == batch_size
        avg = [sum(n / batch_size * g for n, g in zip(sizes, gs)) for gs in zip(*grads)]
        apply_grads(ref, ref_opt, avg)
        assert_close_list(weights(model), weights(ref))
        apply_grads(glob, glob_opt, sam_grad(glob, x, y))  # one global perturbation: different
        assert max_diff(weights(model), weights(glob)) > 1e-8


# -- 7. ESAM through the helper -----------------------------------------------------------------


def make_esam(model, **kwargs):
    return ESAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, **kwargs)


def test_esam_beta_gamma_one_is_sam_exactly():
    model = mlp(seed=10)
    sam_model = copy.deepcopy(model)
    step = SharpnessAwareStep(model, make_esam(model, beta=1.0, gamma=1.0), per_sample_ce)
    sam_step = SharpnessAwareStep(sam_model, make_sam(sam_model), per_sample_ce)
    log = ForwardLog(model)
    for t in range(3):
        x, y = batch(120 + t, 10)
        a, b = step(x, y), sam_step(x, y)
        assert a.took_step and b.took_step
        assert torch.equal(a.loss, b.loss) and torch.equal(a.grad_norm, b.grad_norm)
        assert_equal_list(weights(model), weights(sam_model))
    assert log.sizes == [10, 10] * 3


@pytest.mark.parametrize(("criterion", "sizes"), [("sharpness", [10, 10, 4]), ("loss", [10, 4])])
def test_esam_sds_batch_sizes_and_forward_count(criterion, sizes):
    model = mlp(seed=11)
    opt = make_esam(model, beta=1.0, gamma=0.35, sds_criterion=criterion)  # ceil(3.5) = 4
    step = SharpnessAwareStep(model, opt, per_sample_ce)
    log = ForwardLog(model)
    for t in range(2):
        assert step(*batch(130 + t, 10)).took_step
    assert log.sizes == sizes * 2


def esam_sds_grad(model, x, y, gamma, criterion, rho=RHO, eps=1e-12):
    ps = list(model.parameters())
    l0 = per_sample_ce(model(x), y)
    g = torch.autograd.grad(l0.mean(), ps)
    coef = rho / (flat_norm(g).item() + eps)
    clean = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for p, gi in zip(ps, g):
            p.add_(gi * coef)
        l1 = per_sample_ce(model(x), y)
    score = l0.detach() if criterion == "loss" else l1 - l0.detach()
    k = math.ceil(gamma * x.shape[0])
    index = torch.topk(score, k).indices.sort().values
    g_sam = torch.autograd.grad(per_sample_ce(model(x[index]), y[index]).mean(), ps)
    with torch.no_grad():
        for p, c in zip(ps, clean):
            p.copy_(c)
    return g_sam


@pytest.mark.parametrize("criterion", ["sharpness", "loss"])
def test_esam_sds_equals_manual_reference(criterion):
    model = mlp(seed=12)
    ref = copy.deepcopy(model)
    opt = make_esam(model, beta=1.0, gamma=0.5, sds_criterion=criterion)
    step = SharpnessAwareStep(model, opt, per_sample_ce)
    ref_opt = make_sgd(ref)
    for t in range(3):
        x, y = batch(140 + t, 10)
        out = step(x, y)
        assert out.took_step
        torch.testing.assert_close(
            out.loss, per_sample_ce(ref(x), y).mean().detach(), rtol=1e-14, atol=1e-14
        )
        apply_grads(ref, ref_opt, esam_sds_grad(ref, x, y, 0.5, criterion))
        assert_close_list(weights(model), weights(ref))


def test_esam_swp_equals_manual_loop_with_same_seed():
    model = mlp(seed=13)
    ref = copy.deepcopy(model)
    kwargs = dict(beta=0.5, gamma=0.6, seed=7)
    step = SharpnessAwareStep(model, make_esam(model, **kwargs), per_sample_ce)
    ref_opt = make_esam(ref, **kwargs)
    for t in range(4):
        x, y = batch(150 + t, 10)
        assert step(x, y).took_step
        with ref_opt.swp():
            clean = per_sample_ce(ref(x), y)
            if clean.requires_grad:
                clean.mean().backward()
        ref_opt.first_step(zero_grad=True)
        with torch.no_grad():
            perturbed = per_sample_ce(ref(x), y)
        index = ref_opt.sds_select(clean.detach(), perturbed)
        per_sample_ce(ref(x[index]), y[index]).mean().backward()
        ref_opt.second_step(zero_grad=True)
        assert_equal_list(weights(model), weights(ref))


# -- 8. a plain optimizer -----------------------------------------------------------------------


def test_plain_sgd_one_pass_equals_manual_sgd():
    model = mlp(seed=14)
    ref = copy.deepcopy(model)
    log = ForwardLog(model)
    step = SharpnessAwareStep(model, make_sgd(model), per_sample_ce)
    ref_opt = make_sgd(ref)
    for t in range(3):
        x, y = batch(160 + t, 8)
        out = step(x, y)
        assert out.took_step is True
        loss = per_sample_ce(ref(x), y).mean()
        loss.backward()
        norm = flat_norm([p.grad for p in ref.parameters()])
        ref_opt.step()
        ref_opt.zero_grad()
        assert torch.equal(out.loss, loss.detach())
        torch.testing.assert_close(out.grad_norm, norm, rtol=1e-13, atol=0)
        assert_equal_list(weights(model), weights(ref))
    assert log.sizes == [8] * 3
    assert step.skipped_steps == 0


def test_plain_sgd_clipping_equals_clip_grad_norm():
    model = mlp(seed=15)
    ref = copy.deepcopy(model)
    step = SharpnessAwareStep(model, make_sgd(model), per_sample_ce, max_grad_norm=0.05)
    ref_opt = make_sgd(ref)
    for t in range(3):
        x, y = batch(170 + t, 8)
        out = step(x, y)
        per_sample_ce(ref(x), y).mean().backward()
        total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        assert total.item() > 0.05
        ref_opt.step()
        ref_opt.zero_grad()
        torch.testing.assert_close(out.grad_norm, total, rtol=1e-13, atol=0)
        assert_close_list(weights(model), weights(ref))


def test_plain_sgd_accumulation():
    model = mlp(seed=16)
    ref = copy.deepcopy(model)
    log = ForwardLog(model)
    step = SharpnessAwareStep(model, make_sgd(model), per_sample_ce, accumulation_steps=2)
    ref_opt = make_sgd(ref)
    for t in range(2):
        x, y = batch(180 + t, 8)
        w0 = weights(model)
        first = step(x[:4], y[:4])
        assert first.took_step is None
        assert_equal_list(weights(model), w0)
        assert step(x[4:], y[4:]).took_step is True
        for s in (0, 4):
            (per_sample_ce(ref(x[s : s + 4]), y[s : s + 4]).mean() * 0.5).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert_equal_list(weights(model), weights(ref))
    assert log.sizes == [4] * 4


def test_plain_sgd_non_finite_gradient_skips_with_warning():
    model = poison_mlp(seed=17)
    step = SharpnessAwareStep(model, make_sgd(model), per_sample_ce)
    assert step(*batch(190, 8)).took_step
    w0, s0 = weights(model), opt_state(step.optimizer)
    model[1].reset(poison_at=0)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        out = step(*batch(191, 8))
    assert out.took_step is False and step.skipped_steps == 1
    assert_equal_list(weights(model), w0)
    assert_same_state(opt_state(step.optimizer), s0)
    assert all(p.grad is None for p in model.parameters())
    model[1].reset(None)
    assert step(*batch(192, 8)).took_step
    assert max_diff(weights(model), w0) > 0


def test_sam_non_finite_first_pass_skips_without_amp():
    model = poison_mlp(seed=18)
    step = SharpnessAwareStep(model, make_sam(model), per_sample_ce)
    assert step(*batch(200, 8)).took_step
    w0, s0 = weights(model), opt_state(step.optimizer)
    model[1].reset(poison_at=0)
    with pytest.warns(RuntimeWarning, match="first"):
        out = step(*batch(201, 8))
    assert out.took_step is False and step.skipped_steps == 1
    assert_equal_list(weights(model), w0)
    assert_same_state(opt_state(step.optimizer), s0)


# -- bad arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"m": 0}, "m "),
        ({"m": -2}, "m "),
        ({"accumulation_steps": 0}, "accumulation_steps"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"amp": "fp8"}, "amp"),
        ({"bn_stats": "x"}, "bn_stats"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    model = mlp()
    with pytest.raises(ValueError, match=match):
        SharpnessAwareStep(model, make_sam(model), per_sample_ce, **kwargs)


def test_esam_non_finite_first_pass_through_helper_skips_instead_of_raising():
    """Regression: after a failed first pass, SDS (sharpness criterion) must not ask for l1."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = ESAM(model.parameters(), torch.optim.SGD, lr=0.1, beta=1.0, gamma=0.5)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    calls = []

    def loss_fn(out, t):
        calls.append(len(t))
        losses = torch.nn.functional.cross_entropy(out, t, reduction="none")
        return losses * float("nan") if len(calls) == 1 else losses

    before = [p.detach().clone() for p in model.parameters()]
    step = SharpnessAwareStep(model, opt, loss_fn)
    with pytest.warns(RuntimeWarning, match="first pass"):
        out = step(x, y)
    assert out.took_step is False and opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert calls == [8, 8]  # no selection forward; the second pass still runs (DDP-safe)
