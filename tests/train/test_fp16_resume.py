"""fp16 (``--amp fp16``: autocast plus a GradScaler) survives checkpoints: the step helper's
GradScaler state round-trips through ``state_dict`` / ``load_state_dict`` and a stopped fp16 run
resumes to exactly the weights, momentum and scaler state of an uninterrupted one.

The scaler state matters here: a stopped run that forgot it would start again at the initial
scale and growth counter, so its scale would differ and its fp16 gradients with it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_helpers import FAST, assert_same_weights

from samkit.cli import main
from samkit.optim import SAM
from samkit.rundir import list_checkpoints, load_checkpoint
from samkit.train import SharpnessAwareStep

# The overflow of batches(): the step is skipped with a warning (checked by took_step).
pytestmark = pytest.mark.filterwarnings("ignore:SAM. non-finite gradient:RuntimeWarning")


def per_sample_ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def fp16_step(seed: int = 0) -> SharpnessAwareStep:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    step = SharpnessAwareStep(model, opt, per_sample_ce, amp="fp16")
    # grows every 2 good steps: the state changes at every step
    step.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    return step


def batches(n: int, start: int = 0):
    for t in range(start, start + n):
        g = torch.Generator().manual_seed(100 + t)
        x = torch.randn(32, 6, generator=g)
        if t == 3:
            x[0, 0] = 1e30  # an overflow: the step is skipped and the scale backs off
        yield x, torch.randint(0, 4, (32,), generator=g)


def scaler_state(step: SharpnessAwareStep) -> dict:
    return step.state_dict()["grad_scaler"]


def test_the_step_helpers_grad_scaler_state_round_trips_and_continues_identically():
    a = fp16_step()
    took = [a(x, y).took_step for x, y in batches(6)]
    assert took == [True, True, True, False, True, True]
    state = copy.deepcopy(a.state_dict())
    # the scale moved: 2^10, doubled after steps 1-2, halved by the overflow of step 4, doubled
    # after steps 5-6
    assert state["grad_scaler"]["scale"] == 2.0**11
    assert state["grad_scaler"]["_growth_tracker"] == 0
    assert state["micro"] == 6

    b = fp16_step(seed=1)  # other weights, a fresh scaler
    b.model.load_state_dict(a.model.state_dict())
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))
    assert scaler_state(b) != state["grad_scaler"]
    b.load_state_dict(state)
    assert b.state_dict() == state
    assert b.grad_scaler.get_scale() == 2.0**11
    for x, y in batches(5, start=6):  # the two continue step for step, bit for bit
        out_a, out_b = a(x, y), b(x, y)
        assert out_a.took_step == out_b.took_step
        assert scaler_state(a) == scaler_state(b)
        for p, q in zip(a.model.parameters(), b.model.parameters()):
            assert torch.equal(p, q)


def test_without_the_scaler_state_the_continuation_differs():
    # The control for the test above: what a resume that dropped the scaler state would do.
    a = fp16_step()
    for x, y in batches(6):
        a(x, y)
    b = fp16_step(seed=1)
    b.model.load_state_dict(a.model.state_dict())
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))
    for x, y in batches(3, start=6):
        a(x, y), b(x, y)
    assert scaler_state(a) != scaler_state(b)


@pytest.fixture(scope="module")
def fp16_runs(data, tmp_path_factory):
    """An uninterrupted fp16 run, and one stopped after 11 steps (in epoch 1) and resumed."""
    root = tmp_path_factory.mktemp("fp16")
    argv = ["train", *FAST, "--data-dir", str(data.dirs["fashion_mnist"]), "--batch-size", "16"]
    argv += ["--model-name", "resnet_tiny", "--num-epochs", "2", "--amp", "fp16"]
    argv += ["--optimizer", "sam", "--no-tensorboard"]
    assert main([*argv, "--run-dir", str(root / "whole")]) == 0
    assert main([*argv, "--run-dir", str(root / "resumed"), "--max-steps", "11"]) == 0
    stopped = load_checkpoint(list_checkpoints(root / "resumed" / "checkpoints")[0])
    assert main([*argv, "--run-dir", str(root / "resumed")]) == 0
    newest = {
        name: load_checkpoint(list_checkpoints(root / name / "checkpoints")[0])
        for name in ("whole", "resumed")
    }
    return stopped, newest["whole"], newest["resumed"]


def test_a_stopped_fp16_run_saved_its_grad_scaler(fp16_runs):
    stopped, _, _ = fp16_runs
    assert stopped["global_step"] == 11
    scaler = stopped["step_helper"]["grad_scaler"]
    assert scaler["_growth_tracker"] > 0  # 11 steps since the last change of scale
    assert {"scale", "growth_factor", "backoff_factor", "growth_interval"} <= scaler.keys()


def test_a_resumed_fp16_run_ends_exactly_as_an_uninterrupted_one(fp16_runs):
    _, whole, resumed = fp16_runs
    assert whole["global_step"] == resumed["global_step"] == 16
    assert resumed["step_helper"] == whole["step_helper"]  # the scaler state included
    assert_same_weights(resumed["model"], whole["model"])
    for key, state in whole["optimizer"]["state"].items():  # momentum
        assert_same_weights(resumed["optimizer"]["state"][key], state)
