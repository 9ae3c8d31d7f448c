"""Fixtures for the analysis tests: a small tanh MLP in float64 with its exact Hessian."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, hessian


@dataclasses.dataclass
class SmallProblem:
    model: nn.Module
    loss_fn: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    hessian: torch.Tensor  # exact, dense, float64
    eigenvalues: torch.Tensor  # exact, descending

    @property
    def dim(self) -> int:
        return self.hessian.shape[0]


def exact_hessian(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Dense Hessian of ``loss_fn(model(x), y)`` over the flattened parameters (torch.func)."""
    named = list(model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, p in named:
            params[name] = w[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return loss_fn(functional_call(model, params, (x,)), y)

    return hessian(loss_of)(flat)


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # 5*10 + 10 + 10*3 + 3 = 93 parameters
    return nn.Sequential(nn.Linear(5, 10), nn.Tanh(), nn.Linear(10, 3)).double()


def make_problem(seed: int = 0, train_steps: int = 0) -> SmallProblem:
    model = make_mlp(seed)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    if train_steps:  # full-batch gradient descent towards a minimum
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(train_steps):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
    # Unequal batch sizes: the batch-size weighting must give the mean over all 64 examples.
    batches = [(x[:40], y[:40]), (x[40:], y[40:])]
    h = exact_hessian(model, loss_fn, x, y)
    eig = torch.linalg.eigvalsh(h).flip(0)
    return SmallProblem(model, loss_fn, x, y, batches, h, eig)


@pytest.fixture
def hessian_of():
    """The dense exact-Hessian function, for tests that build their own model."""
    return exact_hessian


@pytest.fixture
def problem() -> SmallProblem:
    return make_problem()


@pytest.fixture
def trained_problem() -> SmallProblem:
    return make_problem(train_steps=300)
