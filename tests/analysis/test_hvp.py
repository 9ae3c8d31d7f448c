"""The Hessian-vector operator keeps its first-order graphs: same numbers, bit for bit, as
rebuilding them at every product, and rebuilt when the weights change."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, jvp

from samkit.analysis import HessianOperator
from samkit.analysis.hvp import rebatch
from samkit.models import create_model


def _vectors(dim: int, n: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(dim, generator=g, dtype=dtype) for _ in range(n)]


def test_kept_graphs_give_the_same_products_bit_for_bit(problem):
    kept = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    rebuilt = HessianOperator(problem.model, problem.loss_fn, problem.batches, graph_memory=0)
    for v in _vectors(kept.dim, 3):
        hv = kept(v)
        assert torch.equal(hv, rebuilt(v))
        torch.testing.assert_close(hv, problem.hessian @ v, rtol=1e-12, atol=1e-13)
    assert kept.num_kept == 2 and kept.kept_bytes > 0
    assert rebuilt.num_kept == 0 and rebuilt.kept_bytes == 0
    assert all(p.grad is None for p in problem.model.parameters())


def test_a_graph_budget_keeps_the_first_batches_and_rebuilds_the_rest(problem):
    whole = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    v = _vectors(whole.dim, 1)[0]
    whole(v)
    first = HessianOperator(problem.model, problem.loss_fn, problem.batches[:1])
    first(v)
    budget = first.kept_bytes  # room for the first batch's graph only
    partial = HessianOperator(problem.model, problem.loss_fn, problem.batches, graph_memory=budget)
    for w in _vectors(whole.dim, 2):
        assert torch.equal(partial(w), whole(w))
    assert partial.num_kept == 1 and partial.kept_bytes == budget


def test_the_graphs_are_rebuilt_when_the_weights_change(hessian_of):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    model.eval()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (16,))
    loss_fn = nn.CrossEntropyLoss()
    op = HessianOperator(model, loss_fn, [(x[:10], y[:10]), (x[10:], y[10:])])
    v = _vectors(op.dim, 1)[0]
    op(v)
    assert op.num_kept == 2
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # in place: the kept graphs are stale
        model[1].running_var.add_(0.3)
    torch.testing.assert_close(op(v), hessian_of(model, loss_fn, x, y) @ v, rtol=1e-12, atol=1e-13)
    assert op.num_kept == 2


def test_matches_forward_over_reverse_on_a_batchnorm_resnet():
    # float32 conv net with BatchNorm (eval mode) and in-place ReLUs, as samkit trains them.
    # Forward-over-reverse (jvp of grad) runs other operations in another order, so the two agree
    # to float32 round-off, not bit for bit; the kept and rebuilt graphs agree exactly.
    torch.manual_seed(0)
    model = create_model("resnet_tiny", 10, 1).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(12, 1, 28, 28)
    y = torch.randint(0, 10, (12,))
    loss_fn = nn.CrossEntropyLoss()
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    kept = HessianOperator(model, loss_fn, batches)
    rebuilt = HessianOperator(model, loss_fn, batches, graph_memory=0)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss_of(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(functional_call(model, (ps, buffers), (x,)), y)

    for v in _vectors(kept.dim, 2, torch.float32):
        hv = kept(v)
        assert torch.equal(hv, rebuilt(v))
        tangents = dict(zip(params, torch.split(v, [p.numel() for p in params.values()])))
        tangents = {n: t.view_as(params[n]) for n, t in tangents.items()}
        _, ref = jvp(grad(loss_of), (params,), (tangents,))
        ref_flat = torch.cat([ref[n].reshape(-1) for n in params])
        scale = float(ref_flat.abs().max())
        torch.testing.assert_close(hv, ref_flat, rtol=0, atol=1e-4 * scale)
    assert not model.training


@pytest.mark.parametrize("graph_memory", [0, 2**30])
def test_a_loss_linear_in_the_weights_has_a_zero_hessian(graph_memory):
    model = nn.Linear(3, 1).double()
    batches = [(torch.randn(5, 3, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.float64))]
    op = HessianOperator(model, lambda out, y: (out - y).mean(), batches, graph_memory=graph_memory)
    assert torch.equal(op(torch.ones(op.dim, dtype=torch.float64)), torch.zeros(op.dim).double())
    assert op(torch.ones(op.dim)).dtype == torch.float32


def test_rebatch_keeps_the_examples_and_their_order(problem):
    batches = rebatch(problem.batches, 24)  # 64 examples: 3 batches of 22, 21, 21
    assert [len(y) for _, y in batches] == [22, 21, 21]
    assert torch.equal(torch.cat([x for x, _ in batches]), problem.x)
    assert torch.equal(torch.cat([y for _, y in batches]), problem.y)
    assert rebatch(batches, 22) == batches  # already so: the same tensors
    assert [len(y) for _, y in rebatch(batches, 64)] == [64]


@pytest.mark.parametrize("size", [64, 16, "auto"])
def test_rebatched_products_are_the_same_hessian(problem, size):
    op = HessianOperator(problem.model, problem.loss_fn, problem.batches, batch_size=size)
    assert op.batch_sizes == {64: [64], 16: [16] * 4, "auto": [64]}[size]
    for v in _vectors(op.dim, 2):
        torch.testing.assert_close(op(v), problem.hessian @ v, rtol=1e-12, atol=1e-13)
    assert op.loss() == pytest.approx(
        float(problem.loss_fn(problem.model(problem.x), problem.y).detach()), rel=1e-12
    )


def test_auto_batches_fit_the_graph_memory(problem):
    probe = HessianOperator(problem.model, problem.loss_fn, [(problem.x[:16], problem.y[:16])])
    probe(_vectors(probe.dim, 1)[0])
    per_example = probe.kept_bytes / 16  # about: the kept bytes also count the gradients
    op = HessianOperator(
        problem.model,
        problem.loss_fn,
        problem.batches,
        batch_size="auto",
        graph_memory=int(20 * per_example),
    )
    assert len(op.batch_sizes) > 1 and max(op.batch_sizes) <= 24 and sum(op.batch_sizes) == 64
    v = _vectors(op.dim, 1)[0]
    torch.testing.assert_close(op(v), problem.hessian @ v, rtol=1e-12, atol=1e-13)
