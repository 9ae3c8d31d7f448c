"""samkit's SAM in timm's machinery (samkit.integrations.timm): ``create_optimizer_v2(opt="sam")``
after ``register_with_timm()``, the public-API recipe (timm's base optimizer wrapped by SAM) and
``SAMNativeScaler`` in timm's one-call step, each compared with SAM written out by hand from the
paper's equations; GradScaler on the CPU (float32 with scaling, fp16 autocast), the refusals, and
examples/timm_sam.py."""

from __future__ import annotations

import copy
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm")

import timm  # noqa: E402
import timm.optim  # noqa: E402
from timm.utils import NativeScaler  # noqa: E402

from samkit.integrations.timm import SAMNativeScaler, register_with_timm  # noqa: E402
from samkit.optim import SAM, create_optimizer  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "timm_sam.py"
LR, MOMENTUM, WD, RHO = 0.05, 0.9, 5e-3, 0.05


# The comparisons with the hand-written SAM run in float64: in float32 the two differ by rounding
# only, but BatchNorm over 8 images amplifies it to ~1e-5 in three steps (~1e-13 in float64).
def make_model(dtype=torch.float64):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=5, in_chans=1)  # BatchNorm, SiLU
    return model.to(dtype)


def batches(n=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 16, 16, generator=g).to(dtype),
             torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]  # fmt: skip


def reference_sam(model, data, *, nesterov=True, clip=None, rho=RHO):
    """SAM (Foret et al. 2021, Algorithm 1) over torch SGD, written from the equations:
    g = grad L(w); e = rho g / ||g||_2 (one norm over all parameters); g' = grad L(w + e),
    optionally clipped to global norm ``clip``; base step at w with g' + wd w (wd = 0 for biases
    and 1-d parameters, timm's groups) and (Nesterov) momentum. Both passes in training mode."""
    named = list(model.named_parameters())
    params = [p for _, p in named]
    decay = [0.0 if p.ndim <= 1 or n.endswith(".bias") else WD for n, p in named]
    bufs = [None] * len(params)
    for x, y in data:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
        e = [rho * gi / (norm + 1e-12) for gi in g]
        w = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        g2 = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, wi in zip(params, w):
                p.copy_(wi)  # back to w
            if clip is not None:
                total = torch.sqrt(sum((gi * gi).sum() for gi in g2))
                g2 = [gi * min(1.0, clip / (float(total) + 1e-6)) for gi in g2]
            for i, p in enumerate(params):
                d = g2[i] + decay[i] * p
                bufs[i] = d.clone() if bufs[i] is None else bufs[i] * MOMENTUM + d
                p.sub_(LR * (d + MOMENTUM * bufs[i] if nesterov else bufs[i]))
    return model


def two_call_steps(model, optimizer, data):
    for x, y in data:
        F.cross_entropy(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.second_step(zero_grad=True)
    return model


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # weights and the BatchNorm running statistics (two training forwards a step)
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-9, atol=1e-11, msg=k)


@pytest.fixture(scope="module")
def registered():
    return register_with_timm()


# -- the optimizer factory -------------------------------------------------------------------


def test_register_adds_sam_over_timms_optimizers(registered):
    assert registered == ["samsgd", "sam", "samadamw"]
    assert register_with_timm() == registered  # again: harmless
    assert {"sam", "samsgd", "samadamw"} <= set(timm.optim.list_optimizers("sam*"))
    opt = timm.optim.create_optimizer_v2(make_model(), opt="samadamw", lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, SAM) and isinstance(opt.base_optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]  # timm's groups


@pytest.mark.parametrize("nesterov", [True, False])
def test_create_optimizer_v2_sam_is_the_papers_sam(registered, nesterov):
    model, data = make_model(), batches()
    expected = reference_sam(copy.deepcopy(model), data, nesterov=nesterov)
    opt = timm.optim.create_optimizer_v2(
        model, opt="sam", lr=LR, momentum=MOMENTUM, weight_decay=WD, rho=RHO, nesterov=nesterov
    )
    assert isinstance(opt, SAM) and opt.param_groups[0]["nesterov"] is nesterov
    assert_same_model(two_call_steps(model, opt, data), expected)


def test_the_public_api_recipe_wraps_timms_optimizer(registered):
    model, data = make_model(), batches()
    expected = reference_sam(copy.deepcopy(model), data)
    base = timm.optim.create_optimizer_v2(
        model, opt="sgd", lr=LR, momentum=MOMENTUM, weight_decay=WD
    )
    opt = SAM(base.param_groups, base, rho=RHO)
    assert_same_model(two_call_steps(model, opt, data), expected)


def test_other_methods_and_unknown_names():
    names = register_with_timm(["sgd"], method="gsam")
    assert names == ["gsamsgd", "gsam"]
    opt = timm.optim.create_optimizer_v2(make_model(), opt="gsam", lr=0.1, alpha=0.3)
    assert type(opt).__name__ == "GSAM" and opt.alpha == 0.3
    with pytest.raises(ValueError, match="option 'rho' must be"):
        timm.optim.create_optimizer_v2(make_model(), opt="sam", lr=0.1, rho=-1.0)
    with pytest.raises(ValueError, match="not found in registry"):
        register_with_timm(["no_such_optimizer"])
    with pytest.raises(ValueError, match="ESAM is not supported"):
        register_with_timm(method="esam")
    with pytest.raises(ValueError, match="not a sharpness-aware method"):
        register_with_timm(method="sgd")
    own = timm.optim.OptimizerRegistry()
    own.register(timm.optim.OptimInfo("sgd", torch.optim.SGD, has_momentum=True))
    own.register(timm.optim.OptimInfo("samsgd", torch.optim.SGD))  # someone else's "samsgd"
    with pytest.raises(ValueError, match="timm already has an optimizer named 'samsgd'"):
        register_with_timm(["sgd"], registry=own)


def test_timm_reads_only_the_last_part_of_a_name(registered):
    # documented pitfall: "sam_adamw" is timm's plain AdamW (timm parses "a_b" as b)
    opt = timm.optim.create_optimizer_v2(make_model(), opt="sam_adamw", lr=1e-3)
    assert type(opt) is torch.optim.AdamW


# -- the loss scaler -------------------------------------------------------------------------


def scaler_steps(model, opt, data, scaler, *, clip=None, autocast=None):
    losses = []
    for x, y in data:

        def forward(x=x, y=y):
            with torch.autocast(
                "cpu", dtype=autocast or torch.float32, enabled=autocast is not None
            ):
                return F.cross_entropy(model(x), y)

        params = model.parameters() if clip is not None else None
        losses.append(scaler(forward(), opt, clip_grad=clip, parameters=params, closure=forward))
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("enabled", [True, False], ids=["scaled", "unscaled"])
@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
def test_sam_native_scaler_is_the_papers_sam(registered, enabled, clip):
    model, data = make_model(), batches()
    expected = reference_sam(copy.deepcopy(model), data, clip=clip)
    opt = timm.optim.create_optimizer_v2(model, opt="sam", lr=LR, weight_decay=WD, rho=RHO)
    scaler = SAMNativeScaler(device="cpu", enabled=enabled)
    assert scaler._scaler.is_enabled() is enabled
    losses = scaler_steps(model, opt, data, scaler, clip=clip)
    assert all(torch.isfinite(loss) for loss in losses) and opt.skipped_steps == 0
    assert scaler.state_dict_key == "amp_scaler"  # timm's CheckpointSaver keeps its state
    assert ("scale" in scaler.state_dict()) is enabled
    assert_same_model(model, expected)


def test_fp16_autocast_on_the_cpu_skips_overflows_and_backs_off_once_each(registered):
    model, data = make_model(torch.float32), batches(4, torch.float32)
    opt = timm.optim.create_optimizer_v2(model, opt="sam", lr=LR, weight_decay=WD)
    scaler = SAMNativeScaler(device="cpu", init_scale=2.0**12)  # overflows at first
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        losses = scaler_steps(model, opt, data, scaler, autocast=torch.float16)
    assert 1 <= opt.skipped_steps < 4  # some steps skipped, then taken
    assert sum(loss is None for loss in losses) <= opt.skipped_steps
    assert scaler._scaler.get_scale() == 2.0**12 * 0.5**opt.skipped_steps
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_overflow_in_the_second_pass_skips_the_step_and_restores_w(registered):
    model = make_model()
    opt = timm.optim.create_optimizer_v2(model, opt="sam", lr=LR, weight_decay=WD)
    scaler = SAMNativeScaler(device="cpu")
    before = copy.deepcopy(model.state_dict())
    x, y = batches(1)[0]
    with pytest.warns(RuntimeWarning, match="non-finite gradient in the second pass"):
        scaler(F.cross_entropy(model(x), y), opt, closure=lambda: model(x).sum() * float("inf"))
    assert opt.skipped_steps == 1 and scaler._scaler.get_scale() == 2.0**15
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k


def test_other_optimizers_get_timms_native_scaler():
    model, data = make_model(), batches(2)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM)
    ours, theirs = SAMNativeScaler(device="cpu"), NativeScaler(device="cpu")
    for x, y in data:
        assert ours(F.cross_entropy(model(x), y), opt, closure=None) is None
        theirs(F.cross_entropy(twin(x), y), twin_opt)
        opt.zero_grad(), twin_opt.zero_grad()
    assert_same_model(model, twin)


def test_what_the_scaler_refuses(registered):
    model = make_model()
    x, y = batches(1)[0]
    forward = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    scaler = SAMNativeScaler(device="cpu")
    sam = timm.optim.create_optimizer_v2(model, opt="sam", lr=0.1)
    cases = [
        (dict(optimizer=sam), TypeError, "needs closure="),
        (dict(optimizer=sam, closure=forward, need_update=False), ValueError, "accumulation"),
        (dict(optimizer=sam, closure=forward, create_graph=True), ValueError, "create_graph"),
        (dict(optimizer=sam, closure=forward, clip_grad=1.0), ValueError, "needs parameters="),
        (
            dict(
                optimizer=timm.optim.create_optimizer_v2(model, opt="lookahead_sam", lr=0.1),
                closure=forward,
            ),
            ValueError,
            "Lookahead around SAM",
        ),  # fmt: skip
        (
            dict(
                optimizer=create_optimizer("esam", model.parameters(), torch.optim.SGD, lr=0.1),
                closure=forward,
            ),
            ValueError,
            "ESAM is not supported",
        ),  # fmt: skip
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            scaler(forward(), **kwargs)
        sam.zero_grad()
        assert not sam.awaiting_second_step  # refused before any pass


def test_the_example_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--steps", "2"])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert out.count("step ") == 2 and "SAM" in out
