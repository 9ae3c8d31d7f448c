"""samkit.optim.numerics: sharded-norm plumbing in one process, finiteness, clipping, and the one
clip / skip / warn implementation (``guarded_step``) that the optimizers and the step helper share.

The multi-process check that sharded norms equal unsharded ones is tests/optim/test_sharded.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from samkit.optim import numerics

F64 = torch.float64


class CountingStep:
    """A stand-in for ``optimizer.step``: counts calls and records the gradients it saw."""

    def __init__(self, grads):
        self.grads, self.calls, self.seen = grads, 0, []

    def __call__(self):
        self.calls += 1
        self.seen.append([g.clone() for g in self.grads])


def grads64():
    return [
        torch.tensor([3.0, -4.0], dtype=F64),
        torch.tensor([[1.0, 2.0], [-2.0, 0.5]], dtype=F64),
    ]


def norm64(grads):
    return torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))


# -- norms ---------------------------------------------------------------------------------------


def test_plain_tensors_are_local_and_have_no_reduce_group():
    t = torch.ones(3)
    assert not numerics.is_dtensor(t)
    assert numerics.local(t) is t
    assert numerics.reduce_key(t, None) == ()
    assert numerics.reduce_key(t, False) == ()
    assert numerics.reduce_key(t, True) == (None,)  # the default process group
    group = object()
    assert numerics.reduce_key(t, group) == (group,)


def test_reduce_keys_map_each_parameter_and_each_key_to_a_device():
    a, b = torch.ones(2), torch.ones(3)
    key_of, devices = numerics.reduce_keys([a, b], None)
    assert key_of == {a: (), b: ()}
    assert devices == {(): a.device}
    key_of, devices = numerics.reduce_keys([a, b], True)
    assert key_of[a] == key_of[b] == (None,) and list(devices) == [(None,)]


@pytest.mark.parametrize("foreach", [True, False])
def test_unsharded_global_norm_is_the_norm_of_the_concatenation(foreach):
    grads = grads64()
    key_of, devices = numerics.reduce_keys(grads, None)
    got = numerics.global_norm(grads, [key_of[g] for g in grads], devices, foreach=foreach)
    assert got.dtype == F64
    torch.testing.assert_close(got, norm64(grads), rtol=0, atol=1e-15)


def test_global_norm_of_half_precision_is_float32_and_of_nothing_is_zero():
    halves = [torch.full((4,), 300.0, dtype=torch.float16)] * 2  # squares overflow in fp16
    key_of, devices = numerics.reduce_keys(halves, None)
    got = numerics.global_norm(halves, [key_of[t] for t in halves], devices, foreach=True)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(300.0 * math.sqrt(8))
    assert numerics.global_norm([], [], {}, foreach=True).item() == 0.0


# -- finiteness, scaling, clipping ---------------------------------------------------------------


def test_is_finite():
    assert numerics.is_finite(1.0) and numerics.is_finite(torch.tensor(2.0))
    assert not numerics.is_finite(float("nan")) and not numerics.is_finite(torch.tensor(math.inf))


def test_clip_coefficient_and_clip_grads_are_exact():
    assert numerics.clip_coefficient(2.0, None) is None
    assert numerics.clip_coefficient(2.0, 2.0) is None  # only a norm ABOVE the maximum is clipped
    assert numerics.clip_coefficient(2.0, 0.5) == 0.5 / (2.0 + 1e-6)
    grads = grads64()
    expected = [g * (0.5 / (norm64(grads).item() + 1e-6)) for g in grads]
    coef = numerics.clip_grads_(grads, norm64(grads).item(), 0.5)
    assert coef == 0.5 / (norm64(grads64()).item() + 1e-6)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))


@pytest.mark.parametrize("foreach", [True, False])
def test_scale_(foreach):
    grads = grads64()
    numerics.scale_(grads, 0.25, foreach=foreach)
    assert all(torch.equal(g, e * 0.25) for g, e in zip(grads, grads64()))


# -- guarded_step ------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [True, False])
def test_guarded_step_clips_by_the_exact_coefficient_then_steps_once(foreach):
    grads = grads64()
    norm = norm64(grads)  # sqrt(25 + 9.25)
    step = CountingStep(grads)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        took = numerics.guarded_step(
            step, grads, norm, max_grad_norm=1.0, owner="T", skipped_before=0, foreach=foreach
        )
    assert took is True and step.calls == 1
    coef = 1.0 / (math.sqrt(34.25) + 1e-6)
    for seen, g, original in zip(step.seen[0], grads, grads64()):
        assert torch.equal(seen, original * coef)  # clipped BEFORE the step, in place
        assert torch.equal(g, original * coef)
    clipped = norm64(grads).item()
    assert clipped < 1.0 and clipped == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("max_grad_norm", [None, 100.0, math.sqrt(34.25)])
def test_guarded_step_leaves_small_gradients_alone(max_grad_norm):
    grads = grads64()
    step = CountingStep(grads)
    took = numerics.guarded_step(
        step, grads, norm64(grads), max_grad_norm=max_grad_norm, owner="T", skipped_before=0
    )
    assert took is True and step.calls == 1
    assert all(torch.equal(g, e) for g, e in zip(grads, grads64()))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_guarded_step_skips_a_non_finite_norm_without_stepping_and_warns(bad):
    grads = grads64()
    grads[0][0] = bad
    before = [g.clone() for g in grads]
    step = CountingStep(grads)
    with pytest.warns(RuntimeWarning) as caught:
        took = numerics.guarded_step(
            step,
            grads,
            norm64(grads),
            max_grad_norm=1e-3,
            this_pass="second",
            owner="SAM",
            skipped_before=2,
        )
    assert took is False and step.calls == 0
    for g, b in zip(grads, before):  # not clipped
        torch.testing.assert_close(g, b, rtol=0, atol=0, equal_nan=True)
    assert str(caught[0].message) == (
        "SAM: non-finite gradient in the second pass; step skipped, weights and optimizer "
        "state unchanged (3 skipped so far)"
    )


def test_guarded_step_skips_when_an_earlier_pass_failed():
    grads = grads64()
    step = CountingStep(grads)
    with pytest.warns(RuntimeWarning, match="non-finite gradient in the first pass; step skipped"):
        took = numerics.guarded_step(
            step,
            grads,
            norm64(grads),  # finite: the failure was in the first pass
            failed_pass="first",
            this_pass="second",
            owner="ESAM",
            skipped_before=0,
        )
    assert took is False and step.calls == 0


def test_guarded_step_without_a_pass_name_and_with_an_agreement_hook():
    grads = grads64()
    step = CountingStep(grads)
    verdicts = []

    def other_replica_failed(ok):
        verdicts.append(ok)
        return False

    with pytest.warns(RuntimeWarning, match=r"^SGD: non-finite gradient; step skipped"):
        took = numerics.guarded_step(
            step, grads, norm64(grads), agree=other_replica_failed, owner="SGD", skipped_before=0
        )
    assert took is False and step.calls == 0 and verdicts == [True]
    took = numerics.guarded_step(
        step, grads, norm64(grads).item(), agree=lambda ok: ok, owner="SGD", skipped_before=1
    )
    assert took is True and step.calls == 1


def test_a_finite_gradient_beyond_float32s_norm_range_is_taken_not_skipped():
    # ||g|| = 2e20 * sqrt(2) overflows float32's sum of squares (max ~3.4e38), not the gradient.
    import warnings

    from torch import nn

    from samkit.optim import SAM
    from samkit.train import SharpnessAwareStep

    w = nn.Parameter(torch.zeros(2))
    opt = SAM([w], torch.optim.SGD, rho=0.05, lr=1e-21)
    w.grad = torch.full((2,), 2e20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-finite gradient; step skipped"
        assert opt.first_step(zero_grad=True)
        w.grad = torch.full((2,), 2e20)
        assert opt.second_step(max_grad_norm=1.0)
    assert opt.skipped_steps == 0 and torch.isfinite(w).all()
    # clipped to norm 1 by the coefficient 1 / (||g|| + 1e-6): w = -lr * g / ||g||
    torch.testing.assert_close(w.detach(), torch.full((2,), -1e-21 / 2**0.5))
    # the plain path of the step helper too
    model = nn.Linear(1, 1, bias=False)
    step = SharpnessAwareStep(
        model, torch.optim.SGD(model.parameters(), lr=1e-22), lambda o, t: o.sum()
    )
    assert step(torch.full((4, 1), 1e20), torch.zeros(4)).took_step
    assert torch.isfinite(model.weight).all()
