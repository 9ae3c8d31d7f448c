"""ESAM under DistributedDataParallel: two gloo processes on 127.0.0.1.

The requirement: the SWP mask is identical on every replica (the same seeded generator), and SDS
selects per replica (each keeps ``ceil(gamma * b)`` of its OWN b samples). With plain SGD (no
momentum, no weight decay) a DDP step is ``w - lr * mean_r(g_r)``, where ``g_r`` is the ESAM
second-pass gradient of replica r alone; so the reference, computed here in one process, runs
``ESAM.step`` (the optimizer's own closure API, not the step helper) on a fresh copy of the model
for each replica's half of the global batch, from the same weights and generator state, and
averages the updated weights. The workers run this file's ``worker`` in subprocesses
(``spawn_workers``, with a hard timeout, so the test cannot hang).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from samkit.optim import ESAM
from samkit.train import SharpnessAwareStep

WORLD = 2
B_LOCAL = 5  # ceil(0.5 * 5) = 3 samples kept per replica (5 of the global 10 would be global SDS)
STEPS = 4
GAMMA = 0.5
TIMEOUT = 120.0
F64 = torch.float64
CRITERIA = ("sharpness", "loss")


class Net(nn.Module):
    """No BatchNorm; six parameter tensors, so the SWP masks vary from step to step."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def make_net():
    torch.manual_seed(0)
    return Net().to(F64)


def make_esam(model, criterion):
    return ESAM(
        model.parameters(),
        torch.optim.SGD,
        rho=0.05,
        beta=0.5,
        gamma=GAMMA,
        sds_criterion=criterion,
        seed=7,
        lr=0.1,
    )


def per_sample_ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def global_batch(t):
    gen = torch.Generator().manual_seed(3000 + t)
    n = WORLD * B_LOCAL
    return torch.randn(n, 5, generator=gen, dtype=F64), torch.randint(0, 3, (n,), generator=gen)


def local(t, rank):
    x, y = global_batch(t)
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    return x[sl], y[sl]


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def record(opt, model, log):
    """Log, per step, which parameters had first-pass gradients (the SWP mask) and the SDS
    selection (batch size, indices)."""
    first_step, sds_select = opt.first_step, opt.sds_select

    def first_step_logged(*args, **kw):
        log["masks"].append([p.grad is not None for p in model.parameters()])
        return first_step(*args, **kw)

    def sds_select_logged(clean, perturbed=None):
        index = sds_select(clean, perturbed)
        log["selected"].append((clean.numel(), index.clone()))
        return index

    opt.first_step, opt.sds_select = first_step_logged, sds_select_logged


# -- the worker (run in each process by tests/_worker_runner.py) -----------------------------------


def worker(rank):
    res = {}
    for criterion in CRITERIA:
        net = make_net()
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = make_esam(net, criterion)
        log = {"masks": [], "selected": [], "generator": []}
        record(opt, net, log)
        step = SharpnessAwareStep(ddp, opt, per_sample_ce)
        for t in range(STEPS):
            assert step(*local(t, rank)).took_step is True
            log["generator"].append(opt.generator.get_state())
        # the masks as every replica saw them, gathered here too
        mask = torch.tensor(log["masks"], dtype=torch.int64)
        gathered = [torch.zeros_like(mask) for _ in range(WORLD)]
        dist.all_gather(gathered, mask)
        res[criterion] = {"weights": weights(net), "gathered_masks": gathered, **log}
    return res


# -- the reference ------------------------------------------------------------------------------


def reference(criterion):
    """One process: per step, ESAM on each replica's half alone from the same weights and
    generator state; the new weights are the mean of the replicas' (SGD without momentum)."""
    current = weights(make_net())
    generator_state = make_esam(make_net(), criterion).generator.get_state()
    logs = [{"masks": [], "selected": []} for _ in range(WORLD)]
    for t in range(STEPS):
        updated = []
        for rank in range(WORLD):
            net = make_net()
            with torch.no_grad():
                for p, w in zip(net.parameters(), current):
                    p.copy_(w)
            opt = make_esam(net, criterion)
            opt.generator.set_state(generator_state)
            record(opt, net, logs[rank])
            x, y = local(t, rank)

            def closure(index=None, net=net, x=x, y=y):
                xb, yb = (x, y) if index is None else (x[index], y[index])
                return per_sample_ce(net(xb), yb)

            opt.step(closure)
            updated.append(weights(net))
            next_state = opt.generator.get_state()
        generator_state = next_state
        current = [torch.stack(ws).mean(0) for ws in zip(*updated)]
    return current, logs


def global_esam(criterion):
    """One process, ESAM on the global batch (global SDS): must NOT match (discrimination)."""
    net = make_net()
    opt = make_esam(net, criterion)
    for t in range(STEPS):
        x, y = global_batch(t)

        def closure(index=None, x=x, y=y):
            xb, yb = (x, y) if index is None else (x[index], y[index])
            return per_sample_ce(net(xb), yb)

        opt.step(closure)
    return weights(net)


# -- the test -----------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)
def test_esam_ddp_same_swp_mask_per_replica_sds_equals_mean_of_replica_steps(
    tmp_path, spawn_workers
):
    r0, r1 = spawn_workers(Path(__file__), tmp_path, world=WORLD, timeout=TIMEOUT)
    keep = math.ceil(GAMMA * B_LOCAL)
    for criterion in CRITERIA:
        a, b = r0[criterion], r1[criterion]
        ref, ref_logs = reference(criterion)

        # the SWP masks: the same on both replicas (gathered in the workers, and per step),
        # non-trivial, and those of the reference
        assert torch.equal(a["gathered_masks"][0], a["gathered_masks"][1])
        assert torch.equal(b["gathered_masks"][0], b["gathered_masks"][1])
        assert a["masks"] == b["masks"] and len(a["masks"]) == STEPS
        flat = [k for m in a["masks"] for k in m]
        assert any(flat) and not all(flat)
        assert len({tuple(m) for m in a["masks"]}) > 1  # a new draw every step
        assert a["masks"] == ref_logs[0]["masks"] == ref_logs[1]["masks"]
        assert all(torch.equal(g, h) for g, h in zip(a["generator"], b["generator"]))

        # SDS per replica: ceil(gamma * b) of its own b samples, as the replica alone selects
        for r, log in enumerate((a, b)):
            assert len(log["selected"]) == STEPS
            for (n, index), (n_ref, index_ref) in zip(log["selected"], ref_logs[r]["selected"]):
                assert n == n_ref == B_LOCAL
                assert index.numel() == keep == 3
                assert torch.equal(index, index_ref)

        # identical replicas, equal to the mean of the replicas' own ESAM steps
        for x, y in zip(a["weights"], b["weights"]):
            assert torch.equal(x, y)
        for x, y in zip(a["weights"], ref):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
        # ... and not to ESAM with one global selection
        glob = global_esam(criterion)
        assert max((x - y).abs().max().item() for x, y in zip(a["weights"], glob)) > 1e-6
