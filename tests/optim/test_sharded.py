"""SAM with parameters sharded across ranks (the FSDP case): ``shard_group`` sums the norms over
the shards, so two ranks holding halves of every tensor perturb and step exactly like one process
holding the whole tensors. Two gloo processes on 127.0.0.1, bounded in time (``spawn_workers``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from samkit.optim import SAM

WORLD = 2
F64 = torch.float64
A = torch.tensor([3.0, 1.0, 2.0, 0.5, 4.0, 1.5], dtype=F64)  # separable quadratic, 6 coordinates
B = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.5, 1.0], dtype=F64)
W0 = torch.tensor([1.0, 2.0, -1.0, 0.5, 0.3, -2.0], dtype=F64)


def loss(w, a, b):
    return (0.5 * a * w * w - b * w).sum()


def run(shards, norm, adaptive, steps=3):
    """SAM on ``len(shards)`` slices of the 6 coordinates; returns perturbations and weights."""
    params = [torch.nn.Parameter(W0[s].clone()) for s in shards]
    opt = SAM(
        params,
        torch.optim.SGD,
        rho=0.3,
        norm=norm,
        adaptive=adaptive,
        shard_group=True if dist.is_initialized() else None,
        lr=0.1,
        momentum=0.9,
    )
    perturbations = []
    for _ in range(steps):
        for p, s in zip(params, shards):
            p.grad = None
            loss(p, A[s], B[s]).backward()
        before = [p.detach().clone() for p in params]
        opt.first_step(zero_grad=True)
        perturbations.append(torch.cat([p.detach() - b for p, b in zip(params, before)]))
        for p, s in zip(params, shards):
            loss(p, A[s], B[s]).backward()
        assert opt.second_step(zero_grad=True)
    return perturbations, torch.cat([p.detach() for p in params])


CASES = [(2.0, False), (2.0, True), (float("inf"), False)]


def worker(rank):
    # this rank's shard of each of two tensors: coordinates [0:3] and [3:6], split in halves
    halves = [slice(0, 2), slice(3, 5)] if rank == 0 else [slice(2, 3), slice(5, 6)]
    results = {case: run(halves, *case) for case in CASES}
    bounds = [(h.start, h.stop) for h in halves]  # weights_only loading refuses slices
    return {"halves": bounds, "results": results}


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)
def test_sharded_norm_reduction_equals_unsharded_sam(tmp_path, spawn_workers):
    ranks = spawn_workers(Path(__file__), tmp_path, world=WORLD, timeout=120.0)
    for case in CASES:
        whole_perturbations, whole_weights = run([slice(0, 3), slice(3, 6)], *case)
        for t, whole in enumerate(whole_perturbations):
            got = torch.zeros(6, dtype=F64)
            for r in ranks:
                idx = torch.cat([torch.arange(a, b) for a, b in r["halves"]])
                got[idx] = r["results"][case][0][t]
            torch.testing.assert_close(got, whole, rtol=0, atol=1e-12)
        weights = torch.zeros(6, dtype=F64)
        for r in ranks:
            idx = torch.cat([torch.arange(a, b) for a, b in r["halves"]])
            weights[idx] = r["results"][case][1]
        torch.testing.assert_close(weights, whole_weights, rtol=0, atol=1e-12)
    # and the reduction matters: without it, shard 1's perturbation would be larger
    local_only, _ = run([slice(2, 3), slice(5, 6)], 2.0, False, steps=1)
    assert not torch.allclose(local_only[0], ranks[1]["results"][(2.0, False)][0][0])
