"""Hessian-vector products, Lanczos, power iteration and SLQ against dense exact Hessians."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from samkit.analysis import (
    HessianOperator,
    gauss_quadrature,
    hessian_spectral_density,
    hessian_top_eigenvalues,
    lanczos,
    plot_spectral_density,
    power_iteration_lambda_max,
    slq_density,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_hvp_matches_exact_hessian(problem):
    op = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    assert op.dim == problem.dim == 93
    assert op.num_examples == 64
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(op.dim, generator=g, dtype=torch.float64)
        torch.testing.assert_close(op(v), problem.hessian @ v, rtol=1e-12, atol=1e-13)
    v32 = torch.randn(op.dim, generator=g)
    assert op(v32).dtype == torch.float32
    assert op.num_calls == 4
    assert all(p.grad is None for p in problem.model.parameters())
    assert op.loss() == pytest.approx(
        float(problem.loss_fn(problem.model(problem.x), problem.y).detach())
    )


def test_hvp_runs_in_eval_mode_and_restores_the_flags(hessian_of):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2)
    ).double()
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (32,))
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    h = hessian_of(model, loss_fn, x, y)  # eval mode: running stats, no dropout
    model.train()
    model[3].eval()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    stats = [b.clone() for b in model.buffers()]

    op = HessianOperator(model, loss_fn, [(x[:20], y[:20]), (x[20:], y[20:])])
    v = torch.randn(op.dim, dtype=torch.float64)
    torch.testing.assert_close(op(v), h @ v, rtol=1e-12, atol=1e-13)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max())


@pytest.mark.parametrize("num_steps", [None, 40])
def test_lanczos_top5_matches_dense_eigendecomposition(problem, num_steps):
    op = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    res = lanczos(op, op.dim, 5, num_steps=num_steps, return_vectors=True)
    exact = problem.eigenvalues[:5]
    assert _rel_err(res.eigenvalues, exact) < 1e-3
    assert res.num_steps < op.dim  # a real Krylov approximation, not a full tridiagonalisation
    assert res.converged
    # Ritz vectors: orthonormal, small residuals, matching the reported bounds
    y = res.eigenvectors
    assert y.shape == (op.dim, 5)
    torch.testing.assert_close(y.T @ y, torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)
    resid = torch.linalg.vector_norm(problem.hessian @ y - y * res.eigenvalues, dim=0)
    torch.testing.assert_close(resid, res.residuals, atol=1e-8, rtol=1e-3)
    assert float(resid.max()) < 1e-3 * float(exact[0])


def test_lanczos_on_a_matrix_is_exact_with_dim_steps():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = (a + a.T) / 2
    exact = torch.linalg.eigvalsh(a)
    res = lanczos(lambda v: a @ v, 30, 30, num_steps=30, tol=None)
    torch.testing.assert_close(res.eigenvalues, exact.flip(0), atol=1e-10, rtol=0)
    small = lanczos(lambda v: a @ v, 30, 3, num_steps=30, which="smallest")
    torch.testing.assert_close(small.eigenvalues, exact[:3], atol=1e-10, rtol=0)
    mag = lanczos(lambda v: a @ v, 30, 1, num_steps=30, which="magnitude")
    assert float(mag.eigenvalues[0].abs()) == pytest.approx(float(exact.abs().max()), rel=1e-10)


def test_lanczos_stops_at_an_invariant_subspace():
    diag = torch.tensor([5.0, 3.0, 3.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    res = lanczos(lambda v: diag * v, 6, 3, v0=torch.tensor([1.0, 1, 0, 1, 0, 0]))
    assert res.num_steps == 3 and res.converged
    torch.testing.assert_close(res.eigenvalues, diag[[0, 1, 3]], atol=1e-12, rtol=0)


def test_lanczos_is_seeded(problem):
    op = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    a = lanczos(op, op.dim, 3, num_steps=10, tol=None, seed=7)
    b = lanczos(op, op.dim, 3, num_steps=10, tol=None, seed=7)
    c = lanczos(op, op.dim, 3, num_steps=10, tol=None, seed=8)
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert not torch.equal(a.eigenvalues, c.eigenvalues)


def test_power_iteration_lambda_max(trained_problem):
    eig = trained_problem.eigenvalues
    assert eig[0] > eig.abs()[1:].max()  # lambda_max dominates: power iteration applies
    op = HessianOperator(trained_problem.model, trained_problem.loss_fn, trained_problem.batches)
    res = power_iteration_lambda_max(op, op.dim, max_iters=1000, tol=1e-9)
    assert res.converged
    assert res.eigenvalue == pytest.approx(float(eig[0]), rel=1e-3)
    v = res.eigenvector
    assert float(torch.linalg.vector_norm(v)) == pytest.approx(1.0)


def test_hessian_top_eigenvalues(problem):
    res = hessian_top_eigenvalues(problem.model, problem.loss_fn, problem.batches, k=5)
    exact = problem.eigenvalues[:5]
    assert _rel_err(torch.tensor(res.eigenvalues, dtype=torch.float64), exact) < 1e-3
    assert res.lambda_max == res.eigenvalues[0]
    assert res.lambda_max_over_lambda_5 == pytest.approx(float(exact[0] / exact[4]), rel=1e-3)
    assert res.num_params == 93 and res.num_examples == 64
    assert res.num_hvp == res.num_lanczos_steps
    assert res.loss == pytest.approx(
        float(problem.loss_fn(problem.model(problem.x), problem.y).detach())
    )
    json.dumps(res.to_dict())
    assert (
        hessian_top_eigenvalues(
            problem.model, problem.loss_fn, problem.batches, k=3
        ).lambda_max_over_lambda_5
        is None
    )


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_gauss_quadrature_is_exact_up_to_degree_2m_minus_1(problem, probe):
    """sum_i w_i theta_i^j == v^T H^j v / v^T v for j <= 2m - 1, for every single probe."""
    op = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    h = problem.hessian
    m = 6
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        if probe == "gaussian":
            v = torch.randn(op.dim, generator=g, dtype=torch.float64)
        else:
            v = torch.randint(0, 2, (op.dim,), generator=g).double() * 2 - 1
        nodes, weights = gauss_quadrature(op, v, m)
        assert nodes.shape == weights.shape == (m,)
        hv = v.clone()
        for j in range(2 * m):
            exact = float(v @ hv / (v @ v))  # v^T H^j v / v^T v
            assert np.sum(weights * nodes**j) == pytest.approx(exact, rel=1e-9, abs=1e-15)
            hv = h @ hv


def test_slq_trace_moments_within_the_hutchinson_variance(problem):
    """Averaged over P Rademacher probes the j = 1, 2 moments are Hutchinson estimates of
    tr(H^j)/n (exact per probe, see above), with Var(v^T A v) = 2 sum_{i != k} A_ik^2."""
    op = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    probes, n = 150, op.dim
    res = slq_density(op, n, num_probes=probes, num_steps=4, seed=0)
    h = problem.hessian
    for j, a in ((1, h), (2, h @ h)):
        off = a - torch.diag(torch.diag(a))
        std = float(torch.sqrt(2 * (off**2).sum() / probes)) / n
        exact = float(torch.trace(a)) / n
        assert abs(res.moment(j) - exact) < 4 * std, (j, res.moment(j), exact, std)


def test_slq_density_integrates_to_one_and_is_serialisable(problem, tmp_path):
    res = hessian_spectral_density(
        problem.model, problem.loss_fn, problem.batches, num_probes=5, num_steps=20, seed=0
    )
    assert np.trapezoid(res.density, res.grid) == pytest.approx(1.0, abs=1e-12)
    assert (res.density >= 0).all()
    lo, hi = float(problem.eigenvalues[-1]), float(problem.eigenvalues[0])
    for nodes, weights in zip(res.nodes, res.weights):
        assert nodes.min() >= lo - 1e-10 and nodes.max() <= hi + 1e-10  # Ritz values interlace
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert res.grid[0] < min(n.min() for n in res.nodes)
    assert res.grid[-1] > max(n.max() for n in res.nodes)
    mean = np.trapezoid(res.grid * res.density, res.grid)  # the kernel keeps the mean
    assert mean == pytest.approx(res.moment(1), abs=1e-4 * (hi - lo))
    d = json.loads(json.dumps(res.to_dict()))
    assert len(d["nodes"]) == 5 and len(d["grid"]) == len(d["density"])
    png = plot_spectral_density(res, tmp_path / "plots" / "density.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    again = hessian_spectral_density(
        problem.model, problem.loss_fn, problem.batches, num_probes=5, num_steps=20, seed=0
    )
    assert np.array_equal(again.density, res.density)
