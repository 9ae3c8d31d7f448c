"""LookSAM, AE-SAM, RST, late-phase SAM and Momentum-SAM under ``SharpnessAwareStep``: the same
weights as their closure form, BatchNorm statistics from the one pass a skipped ascent takes,
bf16 and fp16 (a skipped ascent under fp16 is SGD's step bit for bit), resume, refusals."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_helpers import FAST, read_json

from samkit.cli import main
from samkit.optim.ascent_policy import AESAM, RST, LateSAM
from samkit.optim.looksam import LookSAM
from samkit.optim.momentum_sam import MomentumSAM
from samkit.rundir import load_latest_checkpoint
from samkit.train import SharpnessAwareStep

LR = 0.1

FACTORIES = {
    "looksam": lambda p: LookSAM(p, torch.optim.SGD, k=2, lr=LR, momentum=0.9),
    "aesam": lambda p: AESAM(  # c_t from -1 to 1: both branches within six steps
        p, torch.optim.SGD, lambda1=1.0, lambda2=-1.0, total_steps=6, lr=LR, momentum=0.9
    ),
    "rst": lambda p: RST(p, torch.optim.SGD, p=0.5, seed=4, lr=LR, momentum=0.9),
    "late": lambda p: LateSAM(p, torch.optim.SGD, start_step=3, lr=LR, momentum=0.9),
    "msam": lambda p: MomentumSAM(p, torch.optim.SGD, rho=0.1, lr=LR, momentum=0.9),
}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def batches(n, shape=(5,), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, *shape, generator=g).to(dtype), torch.randint(0, 3, (8,), generator=g))
        for _ in range(n)
    ]


def per_sample_ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_the_helper_equals_the_closure_form(name):
    data = batches(6)
    model = mlp()
    opt = FACTORIES[name](model.parameters())
    passes = []
    for x, y in data:
        calls = []

        def closure(x=x, y=y, calls=calls):
            calls.append(1)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        passes.append(len(calls))
    assert set(passes) == ({1} if name == "msam" else {1, 2})
    helper_model = mlp()
    step = SharpnessAwareStep(
        helper_model, FACTORIES[name](helper_model.parameters()), F.cross_entropy
    )
    for x, y in data:
        assert step(x, y).took_step
    for a, b in zip(weights(model), weights(helper_model)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_batchnorm_and_bf16(name):
    """Each step updates the running statistics once, from its first (or only) pass."""
    model = cnn()
    step = SharpnessAwareStep(model, FACTORIES[name](model.parameters()), per_sample_ce, amp="bf16")
    bn = model[1]
    for t, (x, y) in enumerate(batches(5, shape=(1, 8, 8), dtype=torch.float32)):
        mean = bn.running_mean.clone()
        out = step(x, y)
        assert out.took_step and out.loss.dtype == torch.float32
        assert bn.num_batches_tracked.item() == t + 1
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            expected = 0.9 * mean + 0.1 * model[0](x).float().mean(dim=(0, 2, 3))
        if name != "msam":  # MSAM's pass runs at w~, not at the (restored) w
            torch.testing.assert_close(bn.running_mean, expected, rtol=0, atol=2e-2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "factory",
    [
        lambda p: RST(p, torch.optim.SGD, p=0.0, lr=LR, momentum=0.9),
        lambda p: LateSAM(p, torch.optim.SGD, start_step=100, lr=LR, momentum=0.9),
    ],
    ids=["rst_p0", "late_before_start"],
)
def test_a_skipped_ascent_under_fp16_is_sgd_bit_for_bit(factory):
    data = batches(4, shape=(1, 8, 8), dtype=torch.float32, seed=1)
    x, y = data[2]
    data[2] = (x.clone().index_fill_(0, torch.tensor([0]), 1e30), y)  # an overflow at step 2
    runs = []
    for make in (factory, lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9)):
        model = cnn()
        step = SharpnessAwareStep(model, make(model.parameters()), per_sample_ce, amp="fp16")
        step.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        took = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for x, y in data:
                took.append(step(x, y).took_step)
        runs.append((weights(model), model.state_dict(), step.grad_scaler.get_scale(), took))
    (w_a, s_a, scale_a, took_a), (w_b, s_b, scale_b, took_b) = runs
    assert took_a == took_b == [True, True, False, True]
    assert scale_a == scale_b == 2.0**9  # the overflow backed the scale off
    assert all(torch.equal(a, b) for a, b in zip(w_a, w_b))
    assert all(torch.equal(s_a[k], s_b[k]) for k in s_a)  # BatchNorm buffers too


@pytest.mark.parametrize("name", ["aesam", "rst"])
def test_fp16_with_both_kinds_of_steps(name):
    model = cnn()
    step = SharpnessAwareStep(model, FACTORIES[name](model.parameters()), per_sample_ce, amp="fp16")
    step.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt, skipped = step.optimizer, []
    skip_ascent = opt.skip_ascent
    opt.skip_ascent = lambda: (skipped.append(1), skip_ascent())
    for x, y in batches(6, shape=(1, 8, 8), dtype=torch.float32, seed=2):
        assert step(x, y).took_step
    assert 0 < len(skipped) < 6  # steps with and without the ascent
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_resume_through_the_helper_is_bit_identical(name):
    data = batches(6, shape=(1, 8, 8), dtype=torch.float32, seed=3)

    def fresh():
        model = cnn()
        return model, SharpnessAwareStep(model, FACTORIES[name](model.parameters()), per_sample_ce)

    model, step = fresh()
    for x, y in data:
        step(x, y)
    straight = copy.deepcopy(model.state_dict())

    model, step = fresh()
    for x, y in data[:3]:
        step(x, y)
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": step.optimizer.state_dict(), "step": step.state_dict()}
    )
    model, step = fresh()
    model.load_state_dict(saved["model"])
    step.optimizer.load_state_dict(saved["opt"])
    step.load_state_dict(saved["step"])
    for x, y in data[3:]:
        step(x, y)
    resumed = model.state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_one_first_pass_per_step(name):
    model = mlp()
    opt = FACTORIES[name](model.parameters())
    for kwargs in ({"m": 4}, {"accumulation_steps": 2}):
        with pytest.raises(ValueError, match="one first pass"):
            SharpnessAwareStep(model, opt, F.cross_entropy, **kwargs)
    if name != "msam":
        with pytest.raises(ValueError, match="bn_stats must be 'first' or 'both'"):
            SharpnessAwareStep(model, opt, F.cross_entropy, bn_stats="second")


def test_momentum_sam_restores_the_weights_when_its_pass_fails():
    model = mlp()
    step = SharpnessAwareStep(model, FACTORIES["msam"](model.parameters()), F.cross_entropy)
    data = batches(3)
    for x, y in data[:2]:
        step(x, y)  # a momentum buffer exists: the next pass runs at w~
    before = weights(model)

    def failing(out, y):
        raise MemoryError("out of memory")

    step.loss_fn = failing
    with pytest.raises(MemoryError):
        step(*data[2])
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    step.loss_fn = F.cross_entropy
    step.optimizer.zero_grad()
    assert step(*data[2]).took_step


def test_a_non_finite_pass_skips_every_kind_of_step():
    for name in sorted(FACTORIES):
        model = mlp()
        step = SharpnessAwareStep(model, FACTORIES[name](model.parameters()), F.cross_entropy)
        data = batches(4)
        for x, y in data[:3]:
            step(x, y)
        before = weights(model)
        x, y = data[3]
        with pytest.warns(RuntimeWarning, match="non-finite"):
            assert step(x * math.inf, y).took_step is False
        assert all(torch.equal(a, b) for a, b in zip(before, weights(model))), name


@pytest.mark.parametrize(
    "name,label",
    [("looksam", "LookSAM rho=0.05 k=5 alpha=0.7"), ("rst", "RST rho=0.05 p=0.5"),
     ("msam", "MSAM rho=0.05")],
)  # fmt: skip
def test_samkit_train_runs_each_through_the_registry(data, tmp_path, name, label):
    argv = [*FAST, "--model-name", "resnet_tiny", "--num-epochs", "1", "--batch-size", "8"]
    argv += ["--data-dir", data.dirs["fashion_mnist"], "--run-dir", tmp_path, "--amp", "none"]
    assert main(["train", *map(str, argv), "--optimizer", name, "--max-steps", "3"]) == 0
    summary = read_json(tmp_path / "summary.json")
    assert summary["status"] == "max_steps" and summary["steps"] == 3
    assert summary["skipped_steps"] == 0 and summary["optimizer"] == label
    _, checkpoint = load_latest_checkpoint(tmp_path / "checkpoints")
    samkit_state = checkpoint["optimizer"]["samkit"]
    if name != "msam":
        assert samkit_state["ascent_policy"]["steps"] == 3
    if name == "looksam":
        assert any(v is not None for v in samkit_state["looksam_gv"])
