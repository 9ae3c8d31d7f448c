"""``SharpnessAwareStep`` with SyncBatchNorm under DistributedDataParallel: two processes.

torch's ``SyncBatchNorm`` refuses CPU tensors (torch 2.14.1: "expected input tensor to be on GPU
or XPU"; the kernels of its synchronised statistics have no CPU implementation), so on the CPU
(and DDP refuses SyncBatchNorm layers in CPU modules), the workers turn each BatchNorm layer,
after wrapping, into a stand-in ``SyncBatchNorm`` subclass with the same semantics
(:class:`CpuSyncBatchNorm`: statistics of the union of both replicas' batches through the
differentiable all-reduce of ``torch.distributed.nn``, buffers updated only while
``track_running_stats``, unbiased variance with the global count). What is tested is the step
helper with a BatchNorm whose forward and backward are collectives: its BatchNorm policy and
that every replica runs the same passes. With two or more CUDA devices the same test also runs
torch's own ``SyncBatchNorm`` over NCCL.

(a) SyncBatchNorm + ``sync_perturbations=True`` on per-replica halves == one process with
    ordinary BatchNorm and plain SAM on the global batch: weights AND running buffers.
(b) m-sharpness chunks, extra ascent steps and ESAM's selection forward run the same collectives
    on both replicas (counted), and a non-finite gradient on ONE replica (first pass or ascent
    step) makes both skip the extra forwards and the step, instead of leaving one waiting.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from samkit.optim import ESAM, SAM
from samkit.train import SharpnessAwareStep

WORLD = 2
B_LOCAL = 4
STEPS = 3
TIMEOUT = 150.0
F64 = torch.float64
DEVICE_ENV = "SAMKIT_TEST_SYNCBN_DEVICE"


class CpuSyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm``'s training forward for CPU tensors (a test stand-in, see above)."""

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)  # evaluation: running statistics, no communication
        from torch.distributed.nn.functional import all_reduce

        dims, shape = [0, *range(2, x.ndim)], [1, -1] + [1] * (x.ndim - 2)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        head = all_reduce(torch.cat([x.sum(dims), x.new_tensor([x.numel() // x.shape[1]])]))
        n, mean = head[-1], head[:-1] / head[-1]
        centred = x - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * n / (n - 1))
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out


class Net(nn.Module):
    """Linear -> BatchNorm -> tanh -> Linear. ``poison`` makes the last layer's next weight
    gradient inf: a non-finite gradient on this replica only (it does not flow back through the
    BatchNorm's all-reduce to the other replica)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.poison = False
        self.fc2.weight.register_hook(self._maybe_poison)

    def _maybe_poison(self, grad):
        if self.poison:
            self.poison = False
            return grad * math.inf
        return grad

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def make_net(device="cpu"):
    torch.manual_seed(0)
    return Net().to(device=device, dtype=F64)


def make_sam(model, **kw):
    return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, **kw)


def per_sample_ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def global_batch(t, device="cpu"):
    gen = torch.Generator().manual_seed(2000 + t)
    n = WORLD * B_LOCAL
    x, y = torch.randn(n, 5, generator=gen, dtype=F64), torch.randint(0, 3, (n,), generator=gen)
    return x.to(device), y.to(device)


def local(t, rank, device):
    x, y = global_batch(t, device)
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    return x[sl], y[sl]


def state(model):
    """Weights and BatchNorm buffers, on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# -- the worker (run in each process by tests/_worker_runner.py) -----------------------------------


def synced(net, device):
    """``net`` with SyncBatchNorm, wrapped in DDP. On the CPU (where DDP refuses SyncBatchNorm
    layers too) the BatchNorm layers become the stand-in after wrapping."""
    if device.type == "cuda":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        return net, nn.parallel.DistributedDataParallel(net, device_ids=[device])
    ddp = nn.parallel.DistributedDataParallel(net)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.__class__, m.process_group = CpuSyncBatchNorm, None
    return net, ddp


def worker_device(rank: int) -> torch.device:
    device = torch.device(os.environ.get(DEVICE_ENV, "cpu"))
    return torch.device("cuda", rank) if device.type == "cuda" else device


def worker_backend(rank: int) -> str:
    """For tests/_worker_runner.py: this rank's device, and the backend that goes with it."""
    device = worker_device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        return "nccl"
    return "gloo"


def worker(rank):
    device = worker_device(rank)
    calls = {"n": 0}  # collectives issued by this process (SyncBN, DDP's skip agreement, ...)
    for name in ("all_reduce", "all_gather_into_tensor", "all_gather"):
        original = getattr(dist, name)

        def counted(*args, _original=original, **kw):
            calls["n"] += 1
            return _original(*args, **kw)

        setattr(dist, name, counted)
    res = {}
    # (a) SyncBN + synchronised perturbations == global-batch SAM with ordinary BatchNorm
    net, ddp = synced(make_net(device), device)
    step = SharpnessAwareStep(ddp, make_sam(net), per_sample_ce, sync_perturbations=True)
    for t in range(STEPS):
        assert step(*local(t, rank, device)).took_step is True
    res["sync"] = state(net)

    # (b) every pass issues the same collectives on both replicas, failures included
    cases = {
        "m_ascent": lambda n: SharpnessAwareStep(
            n[1], make_sam(n[0], ascent_steps=3), per_sample_ce, m=2
        ),
        "esam": lambda n: SharpnessAwareStep(
            n[1],
            ESAM(n[0].parameters(), torch.optim.SGD, rho=0.05, lr=0.1, beta=1.0, gamma=0.5),
            per_sample_ce,
        ),
    }
    for name, build in cases.items():
        net, ddp = synced(make_net(device), device)
        step = build((net, ddp))
        before = calls["n"]
        for t in range(2):
            assert step(*local(t, rank, device)).took_step is True
        ok_state = state(net)
        # a non-finite first-pass gradient on rank 0 only (in the second chunk for m = 2)
        out = _poisoned_step(step, net, rank == 0, local(2, rank, device), delay=0)
        params = dict(net.named_parameters())  # the first passes still update the buffers
        res[name] = {
            "took": out.took_step,
            "unchanged": all(torch.equal(ok_state[k], p.cpu()) for k, p in params.items()),
            "calls": calls["n"] - before,
        }
        if name == "m_ascent":  # ... and in the first of two extra ascent steps, on rank 1 only
            out = _poisoned_step(step, net, rank == 1, local(3, rank, device), delay=1)
            res[name]["took_ascent"] = out.took_step
            res[name]["calls"] = calls["n"] - before
        res[name]["final"] = state(net)
    return res


def _poisoned_step(step, net, poison, batch, delay):
    """One step with the ``delay``-th backward of the LAST chunk poisoned on this replica."""
    import warnings

    backward = step._backward
    count = {"n": 0, "chunks": 0}
    chunks = math.ceil(batch[0].shape[0] / (step.m or batch[0].shape[0]))

    def first_pass_hook(loss):
        # backwards per chunk: first pass, ascent step(s), second pass
        per_chunk = step.optimizer.ascent_steps + 1
        if poison and count["n"] == (chunks - 1) * per_chunk + delay:
            net.poison = True
        count["n"] += 1
        return backward(loss)

    step._backward = first_pass_hook
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return step(*batch)
    finally:
        step._backward = backward


def reference():
    """One process, ordinary BatchNorm, plain SAM on the global batch."""
    net = make_net()
    step = SharpnessAwareStep(net, make_sam(net), per_sample_ce)
    for t in range(STEPS):
        step(*global_batch(t))
    return state(net)


# -- the test -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_syncbn_sync_perturbations_equals_global_batch_sam(device, tmp_path, spawn_workers):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    if device == "cuda" and torch.cuda.device_count() < WORLD:
        pytest.skip("torch's SyncBatchNorm needs two CUDA devices (CPU: the stand-in)")
    os.environ[DEVICE_ENV] = device  # read by the workers (spawn_workers copies os.environ)
    try:
        r0, r1 = spawn_workers(Path(__file__), tmp_path, world=WORLD, timeout=TIMEOUT)
    finally:
        del os.environ[DEVICE_ENV]

    # (a) replicas identical, and equal to one process on the global batch: weights and buffers
    ref, init = reference(), state(make_net())
    assert r0["sync"].keys() == ref.keys()
    assert {k for k in ref if k.startswith("bn.")} == {
        "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"
    }  # fmt: skip
    for key in ref:
        torch.testing.assert_close(r0["sync"][key], r1["sync"][key], rtol=0, atol=1e-12)
        torch.testing.assert_close(r0["sync"][key], ref[key], rtol=0, atol=1e-6)
    assert int(ref["bn.num_batches_tracked"]) == STEPS  # the first pass only
    assert not torch.allclose(ref["bn.running_var"], init["bn.running_var"])

    # (b) same collectives on both replicas; a failure on one replica is a skip on both
    for name in ("m_ascent", "esam"):
        a, b = r0[name], r1[name]
        assert a["calls"] == b["calls"] > 0, name
        assert a["took"] is False and b["took"] is False, name
        assert a["unchanged"] and b["unchanged"], name
        for key in a["final"]:
            torch.testing.assert_close(a["final"][key], b["final"][key], rtol=0, atol=1e-12)
    assert r0["m_ascent"]["took_ascent"] is False and r1["m_ascent"]["took_ascent"] is False
