"""MESA and SAF with torch.distributed: two gloo processes (``spawn_workers``, bounded in time).

Each replica's BatchNorm statistics come from its own batches, so MESA's teacher (an EMA of the
model, buffers included) would differ between ranks and the checkpoint (rank 0's) would not be
what the others used: its floating-point buffers are averaged over the ranks after every update.
SAF's bank is filled with every rank's samples at every step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from samkit.train.trajectory import MESA, SAF

DECAY = 0.5


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()


def batch(rank):
    gen = torch.Generator().manual_seed(10 + rank)  # each rank its own samples
    return torch.randn(6, 3, generator=gen, dtype=torch.float64) * (1 + rank)


def worker(rank):
    model = make_model()
    mesa = MESA(model, decay=DECAY)
    before = {k: v.clone() for k, v in mesa.teacher.state_dict().items()}
    model.train()
    outputs = model(batch(rank))  # updates this rank's running statistics
    own = {k: v.clone() for k, v in model.state_dict().items()}
    mesa.after_step(model, outputs.detach(), True)

    saf = SAF(num_samples=4, num_classes=2, lmbda=0.3, tau=5.0, start_epoch=1, epochs_back=1)
    saf.prepare(torch.zeros(2, 3), torch.tensor([2 * rank, 2 * rank + 1]), epoch=0)
    saf.after_step(model, torch.full((2, 2), float(rank + 1), dtype=torch.float64), True)
    return {
        "before": before,
        "own": own,
        "teacher": mesa.teacher.state_dict(),
        "bank": saf.logits[0].clone(),
        "written": saf.written[0].clone(),
    }


def test_mesa_teacher_and_saf_bank_agree_across_ranks(tmp_path, spawn_workers):
    r0, r1 = spawn_workers(Path(__file__), tmp_path, world=2, timeout=120.0)
    assert not torch.equal(r0["own"]["1.running_mean"], r1["own"]["1.running_mean"])
    for key, value in r0["teacher"].items():
        assert torch.equal(value, r1["teacher"][key]), key
        if value.is_floating_point():  # the replicas' EMAs, averaged
            expected = (
                sum(DECAY * r["before"][key] + (1 - DECAY) * r["own"][key] for r in (r0, r1)) / 2
            )
            torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)
    for r in (r0, r1):  # both ranks' samples, in both banks
        assert torch.equal(r["written"], torch.zeros(4, dtype=torch.int64))
        assert torch.equal(r["bank"], torch.tensor([[1.0] * 2] * 2 + [[2.0] * 2] * 2))
