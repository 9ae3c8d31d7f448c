"""Misuse of the library gets a clear error, never a silent wrong step (issue: nothing silently
wrong, item 5): clipping values, sparse gradients, a foreign optimizer, the call order."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from samkit.optim import SAM
from samkit.train import SharpnessAwareStep


def sam_with_grads():
    w = nn.Parameter(torch.ones(3))
    opt = SAM([w], torch.optim.SGD, lr=0.1)
    w.grad = torch.ones(3)
    return w, opt


@pytest.mark.parametrize("bad", [-1.0, 0.0, math.nan])
def test_second_step_refuses_a_max_grad_norm_that_is_not_positive(bad):
    w, opt = sam_with_grads()
    opt.first_step()
    w.grad = torch.ones(3)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        opt.second_step(max_grad_norm=bad)
    assert torch.equal(w.detach(), torch.ones(3) + 0.05 / 3**0.5)  # still at w + e: nothing ran


def test_second_step_without_first_step_raises():
    w, opt = sam_with_grads()
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    assert torch.equal(w.detach(), torch.ones(3))  # no plain step was taken


def test_sparse_gradients_are_refused_naming_the_parameter():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = SAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(10, 4\)\) has a sparse gradient"):
        opt.first_step()


def test_the_step_helper_refuses_an_optimizer_over_another_models_parameters():
    model, other = nn.Linear(2, 2), nn.Linear(2, 2)
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        SharpnessAwareStep(model, SAM(other.parameters(), torch.optim.SGD, lr=0.1), lambda o, t: o)
