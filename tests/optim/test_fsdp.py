"""SAM under real FSDP on CPU (gloo, two processes, bounded in time): the perturbation and the
steps of a fully sharded model equal single-process SAM on the global batch.

* FSDP2 (``fully_shard``): DTensor parameters; norms are summed over the mesh automatically.
* FSDP1 (``FullyShardedDataParallel``): flat parameter shards; ``shard_group=True`` sums them.

The reference runs in the test process on the unsharded model and the whole batch.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from samkit.optim import ESAM, SAM
from samkit.train import SharpnessAwareStep

WORLD, STEPS, BATCH = 2, 3, 8
CASES = {  # name -> SAM options
    "sam": dict(norm=2.0, adaptive=False),
    "asam": dict(norm=2.0, adaptive=True),
    "sam_inf": dict(norm=float("inf"), adaptive=False),
}


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, 7, generator=gen, dtype=torch.float64), torch.randint(3, (BATCH,)))
        for _ in range(STEPS)
    ]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y)


def make_sam(params, shard_group=None, **options) -> SAM:
    return SAM(
        params, torch.optim.SGD, rho=0.5, lr=0.5, momentum=0.9, shard_group=shard_group, **options
    )


def manual_steps(model, opt, rows, full_weights) -> tuple[list, list]:
    """``first_step`` / ``second_step`` by hand; full weights at ``w + e`` and after each step."""
    perturbed, weights = [], []
    for x, y in batches():
        loss_fn(model(x[rows]), y[rows]).backward()
        opt.first_step(zero_grad=True)
        perturbed.append(full_weights(model))
        loss_fn(model(x[rows]), y[rows]).backward()
        assert opt.second_step(zero_grad=True)
        weights.append(full_weights(model))
    return perturbed, weights


def helper_steps(model, opt, rows, full_weights, **kw) -> list:
    step = SharpnessAwareStep(model, opt, loss_fn, max_grad_norm=0.3, **kw)
    weights = []
    for x, y in batches():
        assert step(x[rows], y[rows]).took_step
        weights.append(full_weights(model))
    return weights


def unsharded(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference() -> dict[str, object]:
    everything = slice(None)
    out: dict[str, object] = {}
    for name, options in CASES.items():
        model = build_model()
        out[name] = manual_steps(
            model, make_sam(model.parameters(), **options), everything, unsharded
        )
    model = build_model()
    out["helper"] = helper_steps(model, make_sam(model.parameters()), everything, unsharded)
    return out


def fsdp2_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}


def worker(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)

    def fsdp2_model() -> nn.Module:
        model = build_model()
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    out: dict[str, object] = {}
    for name, options in CASES.items():
        model = fsdp2_model()
        opt = make_sam(model.parameters(), **options)
        out[name] = manual_steps(model, opt, rows, fsdp2_weights)
    model = fsdp2_model()
    out["helper"] = helper_steps(model, make_sam(model.parameters()), rows, fsdp2_weights)

    errors = []  # what a sharded model refuses, with a clear message
    for attempt in (
        lambda: SharpnessAwareStep(
            model, make_sam(model.parameters()), loss_fn, sync_perturbations=False
        ),
        lambda: ESAM(model.parameters(), torch.optim.SGD, lr=0.1),
        lambda: make_sam(model.parameters(), shard_group=True),
    ):
        try:
            attempt()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors

    # FSDP1: one flat parameter per rank, a plain tensor; shard_group=True sums the norms
    plain = build_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1's deprecation notice
        model1 = FullyShardedDataParallel(copy.deepcopy(plain), device_id=torch.device("cpu"))

    def fsdp1_weights(m: nn.Module) -> dict[str, torch.Tensor]:
        with FullyShardedDataParallel.summon_full_params(m):
            return {k: v.detach().clone() for k, v in m.module.state_dict().items()}

    opt1 = make_sam(model1.parameters(), shard_group=True)
    out["fsdp1_flat_numel"] = sum(p.numel() for p in model1.parameters())
    out["fsdp1_helper"] = helper_steps(model1, opt1, rows, fsdp1_weights)
    try:
        SharpnessAwareStep(model1, make_sam(model1.parameters()), loss_fn)
        out["fsdp1_without_group"] = None
    except ValueError as e:
        out["fsdp1_without_group"] = str(e)

    return out


def _fsdp_available() -> bool:
    if not (dist.is_available() and dist.is_gloo_available()):
        return False
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def assert_weights_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-12, msg=k)


@pytest.mark.skipif(not _fsdp_available(), reason="this torch has no FSDP / gloo")
def test_sam_under_fsdp_equals_unsharded_sam_on_the_global_batch(tmp_path, spawn_workers):
    ranks = spawn_workers(Path(__file__), tmp_path, world=WORLD, timeout=180.0)
    want = reference()
    for rank in ranks:
        for name in CASES:  # FSDP2, the perturbation w + e and the step, for p=2, ASAM, p=inf
            for got_steps, want_steps in zip(rank[name], want[name]):
                for got, expected in zip(got_steps, want_steps):
                    assert_weights_close(got, expected)
        for got, expected in zip(rank["helper"], want["helper"]):  # + clipping by global norm
            assert_weights_close(got, expected)
        for got, expected in zip(rank["fsdp1_helper"], want["helper"]):
            assert_weights_close(got, expected)

        sync_false, esam, group_with_dtensor = rank["errors"]
        assert sync_false and "sync_perturbations=False is impossible with FSDP" in sync_false
        assert esam and "ESAM with FSDP-sharded" in esam
        assert group_with_dtensor and "leave shard_group None" in group_with_dtensor
        assert rank["fsdp1_without_group"] and "shard_group=True" in rank["fsdp1_without_group"]
    # each FSDP1 rank really held a shard, not the whole model (7*5+5+5*3+3 = 58 numbers)
    assert all(r["fsdp1_flat_numel"] == 29 for r in ranks)
