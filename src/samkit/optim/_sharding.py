"""Global norms when parameters are sharded across ranks (FSDP).

Under FSDP every rank holds a disjoint shard of each parameter, and the first-pass gradient is
already reduce-scattered, so the SAM perturbation must use the norm of the WHOLE gradient:
``||g|| = sqrt(sum over ranks of ||g_local||^2)``. Everything else in SAM (``e = rho g / ||g||``,
ASAM's ``|w| + eta``, ``sign(g)``) is elementwise and runs on the local shard unchanged.

Two kinds of sharded parameters are recognised:

* ``DTensor`` parameters (FSDP2, ``torch.distributed.fsdp.fully_shard``; also HSDP meshes): the
  squares are summed over the mesh dimensions on which the tensor is ``Shard``-placed, never over
  ``Replicate`` ones. Nothing to configure.
* Plain tensors that are shards (FSDP1 flat parameters, hand-made shards): the optimizer's
  ``shard_group`` (a process group, or True for the default one) says where to sum.

Unsharded, replicated parameters (plain DDP) have no reduction group: each replica keeps its own
norm, the paper's per-replica perturbation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from samkit.optim import _functional as F

try:  # torch.distributed.tensor is absent from builds without distributed support
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None  # type: ignore[assignment,misc]

#: The process groups (``None`` = the default group) to sum a parameter's squared norm over.
ReduceKey = tuple[Any, ...]


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (sharing its storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def reduce_key(param: Tensor, shard_group: Any) -> ReduceKey:
    """Where ``param``'s squared norm is summed: its Shard mesh dims, or ``shard_group``."""
    if is_dtensor(param):
        mesh = param.device_mesh
        return tuple(mesh.get_group(d) for d, pl in enumerate(param.placements) if pl.is_shard())
    if shard_group is None or shard_group is False:
        return ()
    return (None if shard_group is True else shard_group,)


def reduce_keys(
    params: list[Tensor], shard_group: Any
) -> tuple[dict[Tensor, ReduceKey], dict[ReduceKey, torch.device]]:
    """Each parameter's reduce key, and for each key the device its collective runs on (the
    backend's: the first such parameter's). Compute once per set of parameters."""
    key_of: dict[Tensor, ReduceKey] = {}
    devices: dict[ReduceKey, torch.device] = {}
    for p in params:
        key_of[p] = key = reduce_key(p, shard_group)
        devices.setdefault(key, p.device)
    return key_of, devices


def global_norm(
    tensors: list[Tensor],
    keys: list[ReduceKey],
    all_keys: dict[ReduceKey, torch.device],
    *,
    foreach: bool,
) -> Tensor:
    """L2 norm of local ``tensors`` over every shard; ``keys[i]`` is ``tensors[i]``'s reduce key.

    ``all_keys`` (key -> device for its collective) must be the same on every rank, in the same
    order: each sharded key is all-reduced even when this rank has no tensor of it, so no rank
    waits for a collective another rank skipped.
    """
    if not any(all_keys):  # nothing sharded: the plain, collective-free norm
        return F.global_norm(tensors, foreach=foreach)
    by_key: dict[ReduceKey, list[Tensor]] = {key: [] for key in all_keys}
    for t, key in zip(tensors, keys):
        by_key[key].append(t)
    total = None
    for key, group in by_key.items():
        squared = F.global_norm(group, foreach=foreach).to(all_keys[key], torch.float64).square()
        for process_group in key:
            dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=process_group)
        total = squared if total is None else total + squared.to(total.device)
    dtype = max(
        (torch.promote_types(t.dtype, torch.float32) for t in tensors),
        key=lambda d: torch.finfo(d).bits,
        default=torch.float32,
    )
    return total.sqrt().to(dtype)
