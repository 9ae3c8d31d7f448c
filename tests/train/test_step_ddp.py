"""``SharpnessAwareStep`` under DistributedDataParallel: two gloo processes on 127.0.0.1.

Each replica perturbs with its OWN local gradient (first pass, forward included, under
``no_sync``) and only the second-pass gradients are all-reduced, so two replicas with b samples
each must equal ONE process running the helper with ``m = b`` on the global batch of 2b samples.
The workers run this file's ``worker`` in subprocesses (``spawn_workers``, with a hard timeout, so
the test cannot hang); their results come back here, where the comparison happens.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from samkit.optim import SAM
from samkit.train import SharpnessAwareStep

WORLD = 2
B_LOCAL = 4  # samples per replica; the global batch has WORLD * B_LOCAL
SAM_STEPS = 3
ACC = 2  # accumulation phase: ACC micro-batches per optimizer step
TIMEOUT = 120.0
F64 = torch.float64


class Net(nn.Module):
    """No BatchNorm. ``poison_next`` makes the next forward return inf (a non-finite pass)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)
        self.poison_next = False

    def forward(self, x):
        out = self.fc2(torch.tanh(self.fc1(x)))
        if self.poison_next:
            self.poison_next = False
            out = out * math.inf
        return out


def make_net():
    torch.manual_seed(0)
    return Net().to(F64)


def make_sam(model):
    return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


def per_sample_ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def global_batch(t):
    gen = torch.Generator().manual_seed(1000 + t)
    n = WORLD * B_LOCAL
    return torch.randn(n, 5, generator=gen, dtype=F64), torch.randint(0, 3, (n,), generator=gen)


def local(t, rank):
    x, y = global_batch(t)
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    return x[sl], y[sl]


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def momenta(opt):
    return [s["momentum_buffer"].clone() for s in opt.state_dict()["state"].values()]


# -- the worker (run in each process by tests/_worker_runner.py) -----------------------------------


def worker(rank):
    net = make_net()
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = make_sam(net)
    step = SharpnessAwareStep(ddp, opt, per_sample_ce)
    res = {"init": weights(net)}
    for t in range(SAM_STEPS):
        assert step(*local(t, rank)).took_step is True
    res["sam"], res["sam_momenta"] = weights(net), momenta(opt)

    # (c) a non-finite first pass on rank 0 only: both replicas skip
    net.poison_next = rank == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = step(*local(SAM_STEPS, rank))
    res["skip"] = {
        "took_step": out.took_step,
        "skipped_steps": step.skipped_steps,
        "warned": any(issubclass(w.category, RuntimeWarning) for w in caught),
        "weights": weights(net),
        "momenta": momenta(opt),
        "grads_none": all(p.grad is None for p in net.parameters()),
    }

    # gradient accumulation: the synced backward all-reduces the whole accumulated sum
    acc_step = SharpnessAwareStep(ddp, opt, per_sample_ce, accumulation_steps=ACC)
    for j in range(ACC):
        out = acc_step(*local(SAM_STEPS + 1 + j, rank))
        assert out.took_step is (True if j == ACC - 1 else None)
    res["acc"] = weights(net)

    # sync_perturbations: the first-pass gradients are all-reduced too (global perturbation)
    net2 = make_net()
    ddp2 = nn.parallel.DistributedDataParallel(net2)
    step2 = SharpnessAwareStep(ddp2, make_sam(net2), per_sample_ce, sync_perturbations=True)
    for t in range(SAM_STEPS):
        assert step2(*local(t, rank)).took_step is True
    res["sync"] = weights(net2)
    return res


def reference():
    """One process, the helper with m = B_LOCAL on the global batches."""
    net = make_net()
    opt = make_sam(net)
    step = SharpnessAwareStep(net, opt, per_sample_ce, m=B_LOCAL)
    res = {"init": weights(net)}
    for t in range(SAM_STEPS):
        assert step(*global_batch(t)).took_step is True
    res["sam"], res["sam_momenta"] = weights(net), momenta(opt)
    # the skipped step changes nothing; the accumulation phase follows
    acc_step = SharpnessAwareStep(net, opt, per_sample_ce, m=B_LOCAL, accumulation_steps=ACC)
    for j in range(ACC):
        acc_step(*global_batch(SAM_STEPS + 1 + j))
    res["acc"] = weights(net)
    return res


def global_sam():
    """One process, plain SAM on the global batch: ONE perturbation from the averaged gradient."""
    net = make_net()
    step = SharpnessAwareStep(net, make_sam(net), per_sample_ce)
    for t in range(SAM_STEPS):
        step(*global_batch(t))
    return weights(net)


# -- the test -----------------------------------------------------------------------------------


def assert_equal_list(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


def assert_close_list(a, b, atol=1e-10):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)
def test_ddp_local_perturbation_equals_m_sharpness_and_skips_together(tmp_path, spawn_workers):
    r0, r1 = spawn_workers(Path(__file__), tmp_path, world=WORLD, timeout=TIMEOUT)
    ref = reference()
    assert_equal_list(r0["init"], r1["init"])
    assert_equal_list(r0["init"], ref["init"])

    # (a) identical replicas, (b) equal to the single-process m = b run
    assert_equal_list(r0["sam"], r1["sam"])
    assert_equal_list(r0["sam_momenta"], r1["sam_momenta"])
    assert_close_list(r0["sam"], ref["sam"])
    assert_close_list(r0["sam_momenta"], ref["sam_momenta"])
    # ... and NOT equal to one global perturbation (the comparison discriminates)
    glob = global_sam()
    assert max((a - b).abs().max().item() for a, b in zip(r0["sam"], glob)) > 1e-8
    # (b') with sync_perturbations the replicas equal single-process SAM on the global batch
    assert_equal_list(r0["sync"], r1["sync"])
    assert_close_list(r0["sync"], glob)
    assert max((a - b).abs().max().item() for a, b in zip(r0["sync"], ref["sam"])) > 1e-8

    # (c) a non-finite first pass on rank 0 only: both ranks skip, nothing changes
    for r in (r0, r1):
        skip = r["skip"]
        assert skip["took_step"] is False
        assert skip["skipped_steps"] == 1
        assert skip["warned"]
        assert skip["grads_none"]
        assert_equal_list(skip["weights"], r["sam"])
        assert_equal_list(skip["momenta"], r["sam_momenta"])

    # accumulation under DDP, after the skipped step, still equals the single-process run
    assert_equal_list(r0["acc"], r1["acc"])
    assert_close_list(r0["acc"], ref["acc"])
