"""SAM sharpness by projected gradient ascent, and m-sharpness."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from samkit.analysis import m_sharpness, sharpness


class Quadratic(nn.Module):
    """``model(x) = w``; with :func:`quadratic_loss` the loss is ``0.5 w^T A w - b^T w``."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w


def quadratic_loss(a: torch.Tensor, b: torch.Tensor):
    return lambda out, _y: 0.5 * out @ a @ out - b @ out


A = torch.tensor([[3.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # positive definite
B = torch.tensor([1.0, -2.0], dtype=torch.float64)
W = torch.tensor([0.3, 0.2], dtype=torch.float64)
ONE_BATCH = [(torch.zeros(1), torch.zeros(1))]


def L(w: torch.Tensor) -> float:
    return float(0.5 * w @ A @ w - B @ w)


def test_one_step_is_the_sam_step_closed_form():
    rho = 0.3
    g = A @ W - B
    expected = L(W + rho * g / torch.linalg.vector_norm(g)) - L(W)
    res = sharpness(Quadratic(W), quadratic_loss(A, B), ONE_BATCH, rho, steps=1)
    assert res.sharpness == pytest.approx(expected, rel=1e-12)
    assert res.loss == pytest.approx(L(W), rel=1e-14)
    assert res.perturbation_norm == pytest.approx(rho, rel=1e-12)
    assert res.step_losses == [pytest.approx(L(W) + expected, rel=1e-12)]


def test_many_steps_reach_the_max_over_the_ball():
    """For a convex quadratic the max over the ball lies on the sphere: a fine sweep of the
    circle gives it. One SAM step is short of it; projected ascent converges to it."""
    rho = 0.8
    angles = np.linspace(0.0, 2.0 * np.pi, 200_001)
    ring = W.numpy()[None, :] + rho * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    a, b = A.numpy(), B.numpy()
    values = 0.5 * np.einsum("ni,ij,nj->n", ring, a, ring) - ring @ b
    true_max = float(values.max()) - L(W)
    model = Quadratic(W)
    one = sharpness(model, quadratic_loss(A, B), ONE_BATCH, rho, steps=1).sharpness
    many = sharpness(model, quadratic_loss(A, B), ONE_BATCH, rho, steps=60)
    assert one < true_max * (1 - 1e-3)  # the linearised step is not optimal here
    assert many.sharpness == pytest.approx(true_max, rel=1e-6)
    # a feasible point is never above the true max, which the sweep (angle step 3e-5) misses by
    # at most max|f''| (step / 2)^2 / 2 < 1e-8
    assert many.sharpness <= true_max + 1e-8
    assert np.all(np.diff(many.sharpness_per_step) >= 0)
    assert torch.equal(model.w.detach(), W)


def test_nondecreasing_in_k_on_a_fixed_batch_and_restores_everything(problem):
    model = problem.model
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    res = sharpness(model, problem.loss_fn, problem.batches, rho=0.5, steps=6)
    per_step = res.sharpness_per_step
    assert len(per_step) == 6 and per_step[0] > 0
    assert all(b >= a for a, b in zip(per_step, per_step[1:]))
    assert res.sharpness == per_step[-1] == res.max_loss - res.loss
    for k in (1, 2, 4):  # the same numbers when asking for fewer steps
        assert (
            sharpness(model, problem.loss_fn, problem.batches, 0.5, steps=k).sharpness
            == (per_step[k - 1])
        )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    json.dumps(res.to_dict())


def test_degenerate_cases():
    # a zero gradient (stationary point) leaves the estimate at 0 instead of producing NaN
    res = sharpness(
        Quadratic(torch.zeros(2, dtype=torch.float64)),
        quadratic_loss(torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)),
        ONE_BATCH,
        rho=0.1,
        steps=3,
    )
    assert res.sharpness_per_step == [0.0, 0.0, 0.0] and res.step_losses == []
    assert sharpness(Quadratic(W), quadratic_loss(A, B), ONE_BATCH, 0.0, steps=2).sharpness == 0
    with pytest.raises(ValueError, match="rho"):
        sharpness(Quadratic(W), quadratic_loss(A, B), ONE_BATCH, -1.0)
    with pytest.raises(ValueError, match="steps"):
        sharpness(Quadratic(W), quadratic_loss(A, B), ONE_BATCH, 0.1, steps=0)


def test_m_sharpness_chunks_each_get_their_own_perturbation(problem):
    model, loss_fn, x, y = problem.model, problem.loss_fn, problem.x, problem.y
    before = [p.detach().clone() for p in model.parameters()]
    full, m16, m5, capped = m_sharpness(
        model, loss_fn, problem.batches, [64, 16, 5, 16], rho=0.2, steps=2
    )[:3] + m_sharpness(model, loss_fn, problem.batches, [16], rho=0.2, steps=2, max_chunks=2)
    assert full.num_chunks == 1
    assert full.sharpness == sharpness(model, loss_fn, [(x, y)], 0.2, steps=2).sharpness
    assert m16.num_chunks == 4 and m5.num_chunks == 12  # 64 // 5, the 4 left over are dropped
    chunk_values = [
        sharpness(model, loss_fn, [(x[i : i + 16], y[i : i + 16])], 0.2, steps=2).sharpness
        for i in range(0, 64, 16)
    ]
    assert m16.values == chunk_values
    assert m16.sharpness == pytest.approx(sum(chunk_values) / 4, rel=1e-15)
    assert capped.values == chunk_values[:2]
    # evaluating a chunk in micro-batches changes nothing but round-off
    (micro,) = m_sharpness(model, loss_fn, problem.batches, [16], 0.2, steps=2, micro_batch_size=6)
    assert micro.values == pytest.approx(chunk_values, rel=1e-10)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    json.dumps(m16.to_dict())
    with pytest.raises(ValueError, match="larger than"):
        m_sharpness(model, loss_fn, problem.batches, [65])
    with pytest.raises(ValueError, match="m must be"):
        m_sharpness(model, loss_fn, problem.batches, [0])
    assert math.isfinite(m5.std)
