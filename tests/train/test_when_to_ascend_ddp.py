"""SAM on some steps only, and Momentum-SAM, under DistributedDataParallel (two gloo processes).

Every replica must take the same decision, or the ones that ascend wait forever in the second
pass's all-reduce: AE-SAM's statistic is the replicas' average of their own ``||g||^2``, RST's draws
come from the same seeded generator. The replicas end equal, and equal to a reference written here
(each replica perturbs with its own gradient; a step without ascent averages the first-pass
gradients); Momentum-SAM and LookSAM (with ``sync_perturbations``) equal one process on the global
batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from samkit.optim.ascent_policy import AESAM, RST
from samkit.optim.looksam import LookSAM
from samkit.optim.momentum_sam import MomentumSAM
from samkit.train import SharpnessAwareStep

WORLD, B_LOCAL, STEPS, TIMEOUT = 2, 4, 6, 120.0
LR, MU, RHO, SEED = 0.1, 0.9, 0.05, 5
F64 = torch.float64


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)


FACTORIES = {
    "aesam": lambda p: AESAM(
        p, torch.optim.SGD, rho=RHO, delta=0.5, total_steps=STEPS, lr=LR, momentum=MU
    ),
    "rst": lambda p: RST(p, torch.optim.SGD, rho=RHO, p=0.5, seed=SEED, lr=LR, momentum=MU),
    "msam": lambda p: MomentumSAM(p, torch.optim.SGD, rho=0.2, lr=LR, momentum=MU),
    "looksam": lambda p: LookSAM(p, torch.optim.SGD, rho=RHO, k=2, lr=LR, momentum=MU),
}


def global_batch(t):
    gen = torch.Generator().manual_seed(1000 + t)
    n = WORLD * B_LOCAL
    return torch.randn(n, 5, generator=gen, dtype=F64), torch.randint(0, 3, (n,), generator=gen)


def local(t, rank):
    x, y = global_batch(t)
    return x[rank * B_LOCAL : (rank + 1) * B_LOCAL], y[rank * B_LOCAL : (rank + 1) * B_LOCAL]


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def worker(rank):
    res = {}
    for name, factory in FACTORIES.items():
        net = make_net()
        opt = factory(net.parameters())
        skipped = []
        skip_ascent = opt.skip_ascent
        opt.skip_ascent = lambda skipped=skipped, f=skip_ascent: (skipped.append(True), f())
        sync = name == "looksam"  # LookSAM keeps the clean gradient: the global one under DDP
        ddp = nn.parallel.DistributedDataParallel(net)
        step = SharpnessAwareStep(ddp, opt, F.cross_entropy, sync_perturbations=sync)
        passes = []
        for t in range(STEPS):
            before = len(skipped)
            assert step(*local(t, rank)).took_step
            passes.append(1 if len(skipped) > before else 2)
        res[name] = {"weights": weights(net), "passes": passes, "policy": opt.state_dict()}
    return res


# -- references, in this process ----------------------------------------------------------------


def grad_at(model, w, x, y):
    w = [t.detach().requires_grad_(True) for t in w]
    params = dict(zip([n for n, _ in model.named_parameters()], w))
    loss = F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    return list(torch.autograd.grad(loss, w))


def sq(g):
    return sum((t * t).sum() for t in g).item()


def per_replica_reference(decide):
    """Each replica's own perturbation; ``decide(t, stat)`` from the averaged ||g_r||^2."""
    model = make_net()
    w, v, passes = weights(model), None, []
    for t in range(STEPS):
        halves = [local(t, r) for r in range(WORLD)]
        gs = [grad_at(model, w, x, y) for x, y in halves]
        sam = decide(t, sum(sq(g) for g in gs) / WORLD)
        passes.append(2 if sam else 1)
        if sam:
            gs = [
                grad_at(model, [a + RHO * b / math.sqrt(sq(g)) for a, b in zip(w, g)], x, y)
                for g, (x, y) in zip(gs, halves)
            ]
        u = [sum(parts) / WORLD for parts in zip(*gs)]
        v = u if v is None else [MU * a + b for a, b in zip(v, u)]
        w = [a - LR * b for a, b in zip(w, v)]
    return w, passes


def aesam_decisions():
    state = {"mu": 0.0, "var": 0.0}

    def decide(t, x):
        state["mu"] = 0.5 * state["mu"] + 0.5 * x
        state["var"] = 0.5 * state["var"] + 0.5 * (x - state["mu"]) ** 2
        c = (t / STEPS) * -1.0 + (1 - t / STEPS) * 1.0  # the defaults: from 1 to -1
        return x >= state["mu"] + c * math.sqrt(state["var"])

    return decide


def rst_decisions():
    gen = torch.Generator().manual_seed(SEED)
    return lambda t, x: torch.rand((), generator=gen, dtype=F64).item() < 0.5


def global_reference(name):
    net = make_net()
    step = SharpnessAwareStep(net, FACTORIES[name](net.parameters()), F.cross_entropy)
    for t in range(STEPS):
        step(*global_batch(t))
    return weights(net)


def assert_close(a, b, atol=1e-10):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)
def test_replicas_decide_alike_and_equal_the_references(tmp_path, spawn_workers):
    r0, r1 = spawn_workers(Path(__file__), tmp_path, world=WORLD, timeout=TIMEOUT)
    for name in FACTORIES:
        assert r0[name]["passes"] == r1[name]["passes"], name
        assert all(torch.equal(a, b) for a, b in zip(r0[name]["weights"], r1[name]["weights"]))
    for name, decide in (("aesam", aesam_decisions()), ("rst", rst_decisions())):
        expected, passes = per_replica_reference(decide)
        assert r0[name]["passes"] == passes and set(passes) == {1, 2}, name
        assert_close(r0[name]["weights"], expected)
        # the same policy state on both replicas (what the next decisions read)
        a, b = (r[name]["policy"]["samkit"]["ascent_policy"] for r in (r0, r1))
        assert a["steps"] == b["steps"] == STEPS
        if name == "aesam":
            assert (a["mean"], a["var"]) == (b["mean"], b["var"])
        else:
            assert torch.equal(a["generator"], b["generator"])
    assert r0["looksam"]["passes"] == [2, 1, 2, 1, 2, 1]
    for name in ("msam", "looksam"):
        assert_close(r0[name]["weights"], global_reference(name))
