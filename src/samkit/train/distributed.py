"""``samkit train`` under ``torchrun``: the process group and the data shards.

``torchrun --nproc_per_node N -m samkit train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR`` / ``MASTER_PORT``) in their environment.
:func:`from_env` reads them; :func:`init_process_group` joins the group with NCCL when training
on CUDA and gloo otherwise. :func:`eval_shard` cuts every rank's share out of an evaluation set
(training batches are sharded by the loader: ``make_loader(..., shard=(rank, world_size))``).
:func:`fsdp_shard_group` tells the training step which process group FSDP shards sum their
norms over.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from samkit.optim import SAM, numerics

__all__ = [
    "DistInfo",
    "convert_sync_batchnorm",
    "eval_shard",
    "exit_without_teardown",
    "from_env",
    "init_process_group",
    "sync_bn_supported",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo | None:
    """The torchrun environment, or None when not launched by torchrun (or with one process)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    return DistInfo(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(info: DistInfo, device: torch.device, timeout_seconds: float) -> bool:
    """Join the torchrun group (env:// rendezvous); True if this call created it."""
    if dist.is_initialized():
        return False
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(
        backend_for(device),
        timeout=timedelta(seconds=timeout_seconds),
        rank=info.rank,
        world_size=info.world_size,
        **kwargs,
    )
    return True


#: Device types on which ``torch.nn.SyncBatchNorm`` synchronises (it refuses CPU tensors: the
#: kernels of its all-gathered statistics exist for accelerators only).
SYNC_BN_DEVICE_TYPES = ("cuda", "xpu", "hpu")


def sync_bn_supported(device: torch.device) -> bool:
    """Whether ``torch.nn.SyncBatchNorm`` can train on ``device`` in a process group."""
    return device.type in SYNC_BN_DEVICE_TYPES


def convert_sync_batchnorm(model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """``model`` with every BatchNorm layer replaced by ``torch.nn.SyncBatchNorm`` (same
    parameters, buffers and ``state_dict`` keys), and how many layers were converted."""
    count = sum(isinstance(m, _BatchNorm) for m in model.modules())
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model), count


def eval_shard(n: int, info: DistInfo) -> range:
    """Contiguous, disjoint shards covering ``range(n)`` exactly: the first ``n % world`` ranks get
    one example more; nothing is padded or repeated."""
    base, extra = divmod(n, info.world_size)
    start = info.rank * base + min(info.rank, extra)
    return range(start, start + base + (1 if info.rank < extra else 0))


def exit_without_teardown(code: int = 0) -> None:
    """End a finished process of a group at once, skipping the process group's C++ teardown.

    gloo's teardown races with the other ranks' exits and was seen to abort finished processes
    ("terminate called without an active exception", SIGABRT). Call it after a barrier, once every
    result is written.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fsdp_shard_group(model: nn.Module, optimizer: Optimizer) -> Any:
    """None without FSDP; else the group plain-tensor shards sum their norms over (``()`` when the
    parameters are DTensors, which know their own mesh)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(numerics.is_dtensor(p) for p in params):
        return ()
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed support
        return None
    if isinstance(model, FullyShardedDataParallel):
        if isinstance(optimizer, SAM) and optimizer.shard_group in (None, False):
            raise ValueError(
                "FullyShardedDataParallel holds flat parameter shards: build SAM with "
                "shard_group=True (or the FSDP process group) so its norms cover every shard"
            )
        return model.process_group
    return None
