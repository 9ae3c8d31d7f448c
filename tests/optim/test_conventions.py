"""How frameworks call an optimizer: step() without a closure after first_step() (GradScaler,
Accelerate, the HF Trainer), LR schedulers that read momentum / betas from ``defaults``, wrappers
(Lightning's copy of ``__dict__``, Accelerate's ``.optimizer``), gradients accumulated outside
``step(closure)``, and GradScaler in the two-call and closure forms."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from samkit.optim import ESAM, SAM, unwrap
from samkit.train.step import SharpnessAwareStep


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


# -- wrappers: Lightning copies __dict__, Accelerate holds .optimizer ------------------------------


class LightningStyleWrapper:
    """What Lightning's LightningOptimizer does to the optimizer it wraps: a dynamic subclass of
    both classes holding a shallow copy of the optimizer's ``__dict__``."""

    def __init__(self, optimizer):
        self.__dict__ = {k: v for k, v in optimizer.__dict__.items() if k != "step"}
        self._optimizer = optimizer
        self.__class__ = type(
            "Wrapped" + type(optimizer).__name__, (type(self), type(optimizer)), {}
        )


class AccelerateStyleWrapper:
    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups


def test_methods_called_on_a_copying_wrapper_keep_the_optimizers_bookkeeping():
    model, x, y = setup(2)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    wrapped = LightningStyleWrapper(opt)
    assert unwrap(wrapped) is opt and unwrap(AccelerateStyleWrapper(wrapped)) is opt
    nn.functional.cross_entropy(model(x), y).backward()
    wrapped.first_step(zero_grad=True)
    assert opt.awaiting_second_step and wrapped.awaiting_second_step
    (nn.functional.cross_entropy(model(x), y) * float("inf")).backward()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert wrapped.second_step(zero_grad=True) is False
    # the count is on the optimizer itself, and in what it saves
    assert opt.skipped_steps == wrapped.skipped_steps == 1
    assert opt.state_dict()["samkit"]["skipped_steps"] == 1
    assert wrapped.state_dict()["samkit"]["skipped_steps"] == 1


def test_unwrap_leaves_other_objects_alone():
    model, _, _ = setup()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert unwrap(sgd) is sgd and unwrap(sam) is sam  # not sam.base_optimizer
    assert unwrap(AccelerateStyleWrapper(sgd)) is sgd
    assert unwrap(None) is None


def test_sharpness_aware_step_accepts_a_wrapped_optimizer():
    model, x, y = setup(3)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = SAM(a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt_b = SAM(b.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    step_a = SharpnessAwareStep(a, AccelerateStyleWrapper(opt_a), nn.functional.cross_entropy)
    step_b = SharpnessAwareStep(b, opt_b, nn.functional.cross_entropy)
    assert step_a.optimizer is opt_a
    for _ in range(2):
        step_a(x, y), step_b(x, y)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# -- step(closure): after first_step, and with gradients accumulated elsewhere --------------------


def test_step_with_a_closure_after_first_step_runs_it_as_the_second_pass():
    model, x, y = setup(4)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = SAM(a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt_b = SAM(b.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    for _ in range(2):
        two_calls(opt_a, a, x, y, lambda o: o.second_step(zero_grad=True))
        nn.functional.cross_entropy(b(x), y).backward()
        opt_b.first_step(zero_grad=True)
        loss = opt_b.step(lambda: nn.functional.cross_entropy(b(x), y).backward() or 7.0)
        assert loss == 7.0
        opt_b.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_step_closure_refuses_gradients_accumulated_before_it():
    model, x, y = setup(5)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)

    def closure_without_zero_grad():  # a framework's accumulation: no zero_grad in between
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    nn.functional.cross_entropy(model(x[:4]), y[:4]).backward()  # micro-batch 1, outside step()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="accumulated by a framework"):
        opt.step(closure_without_zero_grad)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_step_closure_accepts_its_own_leftovers_and_zeroed_gradients():
    model, x, y = setup(6)
    reference = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ref_opt = SAM(reference.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for i in range(3):  # the second-pass gradients each step leaves behind are not foreign
        if i == 2:
            opt.zero_grad(set_to_none=False)  # zeros are harmless too
        opt.step(closure)
        two_calls(ref_opt, reference, x, y, lambda o: o.second_step(zero_grad=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


# -- GradScaler (fp16): the two-call form, the closure form, overflows ----------------------------
# A power-of-two scale multiplies and divides exactly, so a scaled SAM step equals the unscaled one
# bit for bit: the tests compare with torch.equal.


def scaled_loss(model, x, y, factor=1.0):
    return nn.functional.cross_entropy(model(x), y) * factor


def test_grad_scaler_two_call_form_equals_the_unscaled_step():
    model, x, y = setup(7)
    reference = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ref_opt = SAM(reference.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        scaler.scale(scaled_loss(model, x, y)).backward()
        opt.first_step(zero_grad=True, scaler=scaler)
        scaler.scale(scaled_loss(model, x, y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        two_calls(ref_opt, reference, x, y, lambda o: o.second_step(zero_grad=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert scaler.get_scale() == 2.0**10


def test_grad_scaler_closure_form_equals_the_unscaled_step():
    model, x, y = setup(8)
    reference = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ref_opt = SAM(reference.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)

    def closure():
        opt.zero_grad()
        loss = scaled_loss(model, x, y)
        scaler.scale(loss).backward()
        return loss

    for _ in range(3):
        opt.step(closure, scaler=scaler)
        scaler.update()
        two_calls(ref_opt, reference, x, y, lambda o: o.second_step(zero_grad=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("form", ["two_calls", "closure"])
@pytest.mark.parametrize("failing", ["first", "second"])
def test_grad_scaler_overflow_skips_restores_and_backs_off_once(form, failing):
    model, x, y = setup(9)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    passes = []

    def loss_of_this_pass():
        passes.append(len(passes))
        bad = (failing == "first") == (len(passes) == 1)
        return scaled_loss(model, x, y, float("inf") if bad else 1.0)

    with pytest.warns(RuntimeWarning, match=f"non-finite gradient in the {failing} pass"):
        if form == "closure":

            def closure():
                opt.zero_grad()
                loss = loss_of_this_pass()
                scaler.scale(loss).backward()
                return loss

            opt.step(closure, scaler=scaler)
        else:
            scaler.scale(loss_of_this_pass()).backward()
            opt.first_step(zero_grad=True, scaler=scaler)
            scaler.scale(loss_of_this_pass()).backward()
            scaler.step(opt)
        scaler.update()
    # the weights are w again (not w + e), bit for bit; the step counted as skipped
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.skipped_steps == 1 and not opt.awaiting_second_step
    assert opt.state == {} or all(not s for s in opt.state.values())  # no momentum yet
    assert scaler.get_scale() == 2.0**9  # backed off exactly once


def test_grad_scaler_without_first_step_is_a_clear_error():
    model, x, y = setup(10)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(scaled_loss(model, x, y)).backward()
    with pytest.raises(RuntimeError, match="called by a GradScaler with no first_step"):
        scaler.step(opt)


def test_methods_called_on_lightnings_own_wrapper_act_on_the_optimizer():
    lightning_optimizer = pytest.importorskip("lightning.pytorch.core.optimizer")
    model, x, y = setup(11)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    wrapped = lightning_optimizer.LightningOptimizer(opt)
    assert unwrap(wrapped) is opt
    nn.functional.cross_entropy(model(x), y).backward()
    wrapped.first_step(zero_grad=True)
    assert opt.awaiting_second_step
    (nn.functional.cross_entropy(model(x), y) * float("inf")).backward()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert wrapped.second_step(zero_grad=True) is False
    assert opt.skipped_steps == wrapped.skipped_steps == 1
    assert opt.state_dict()["samkit"]["skipped_steps"] == 1


def test_an_exception_in_a_later_pass_of_step_closure_restores_w():
    model, x, y = setup(12)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("out of memory in the second pass")
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(MemoryError):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not opt.awaiting_second_step
