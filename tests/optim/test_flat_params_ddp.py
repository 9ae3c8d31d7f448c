"""``SAM(flat=True)`` under DistributedDataParallel: two gloo processes on 127.0.0.1.

DDP writes the all-reduced gradients into ``p.grad`` (in place, since the gradients exist: they
are the flat buffer's views) and broadcasts the weights in place, so the flat path must give what
the per-tensor path gives on the same replicas, through the step helper (local perturbations,
accumulation, a skipped step) and the two-call loop, with the optimizer built before or after
wrapping the model. The workers run this file's ``worker`` (``spawn_workers``, bounded in time).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samkit.optim import SAM
from samkit.train import SharpnessAwareStep

WORLD = 2
B_LOCAL = 4
STEPS = 3
F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-14)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.poison_next = False

    def forward(self, x):
        out = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        if self.poison_next:
            self.poison_next = False
            out = out * math.inf
        return out


def batch(t, rank):
    gen = torch.Generator().manual_seed(2000 + t)
    x = torch.randn(WORLD * B_LOCAL, 5, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (WORLD * B_LOCAL,), generator=gen)
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    return x[sl], y[sl]


def run(rank, flat, optimizer_first):
    torch.manual_seed(0)
    net = Net().to(F64)
    opt = None
    if optimizer_first:
        opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, flat=flat)
    ddp = nn.parallel.DistributedDataParallel(net)
    if opt is None:
        opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, flat=flat)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    step = SharpnessAwareStep(ddp, opt, loss_fn)
    for t in range(STEPS):
        assert step(*batch(t, rank)).took_step is True
    net.poison_next = rank == 0  # a non-finite pass on one replica: both skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert step(*batch(STEPS, rank)).took_step is False
    acc = SharpnessAwareStep(ddp, opt, loss_fn, accumulation_steps=2)
    for j in range(2):
        acc(*batch(STEPS + 1 + j, rank))
    grads = [g["params"][0].grad for g in opt.param_groups] if flat else []
    bound = True
    for t in range(2):  # the raw two-call loop: DDP all-reduces both passes
        x, y = batch(10 + t, rank)
        F.cross_entropy(ddp(x), y).backward()
        # DDP wrote the averaged gradients into the buffer's views: nothing was copied
        bound = bound and all(g["params"][0].grad is b for g, b in zip(opt.param_groups, grads))
        opt.first_step(zero_grad=True)
        F.cross_entropy(ddp(x), y).backward()
        opt.second_step(zero_grad=True)
    return {
        "weights": [p.detach().clone() for p in net.parameters()],
        "state": opt.state_dict(),
        "skipped": opt.skipped_steps,
        "bound": bound,
    }


def worker(rank):
    return {
        (flat, first): run(rank, flat, first) for flat in (False, True) for first in (False, True)
    }


def test_flat_equals_per_tensor_under_ddp(tmp_path, spawn_workers):
    ranks = spawn_workers(Path(__file__), tmp_path, world=WORLD, timeout=180.0)
    for res in ranks:
        reference = res[(False, False)]
        assert reference["skipped"] == 1
        for key, got in res.items():
            assert got["skipped"] == 1, key
            assert got["bound"], key
            for a, b in zip(reference["weights"], got["weights"]):
                torch.testing.assert_close(a, b, **TOL, msg=str(key))
            for i, fields in reference["state"]["state"].items():
                torch.testing.assert_close(
                    fields["momentum_buffer"], got["state"]["state"][i]["momentum_buffer"], **TOL
                )
    for a, b in zip(ranks[0][(True, True)]["weights"], ranks[1][(True, True)]["weights"]):
        torch.testing.assert_close(a, b, **TOL)  # the replicas stay equal
