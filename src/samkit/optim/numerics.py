"""Gradient numerics shared by the sharpness-aware optimizers and the training step helper.

What is here:

* Global norms when parameters are sharded across ranks (FSDP): :func:`is_dtensor`,
  :func:`local`, :func:`reduce_key`, :func:`reduce_keys` and :func:`global_norm`.
* Finiteness (:func:`is_finite`), gradient clipping (:func:`clip_coefficient`,
  :func:`clip_grads_`) and in-place scaling (:func:`scale_`, e.g. to unscale fp16 gradients).
* :func:`guarded_step`: the one implementation of "clip, or skip on a non-finite gradient, then
  step" that ``SharpnessAwareOptimizer.second_step`` and ``SharpnessAwareStep``'s plain path use.

Sharded norms. Under FSDP every rank holds a disjoint shard of each parameter, and the first-pass
gradient is already reduce-scattered, so the SAM perturbation must use the norm of the WHOLE
gradient: ``||g|| = sqrt(sum over ranks of ||g_local||^2)``. Everything else in SAM
(``e = rho g / ||g||``, ASAM's ``|w| + eta``, ``sign(g)``) is elementwise and runs on the local
shard unchanged. Two kinds of sharded parameters are recognised:

* ``DTensor`` parameters (FSDP2, ``torch.distributed.fsdp.fully_shard``; also HSDP meshes): the
  squares are summed over the mesh dimensions on which the tensor is ``Shard``-placed, never over
  ``Replicate`` ones. Nothing to configure.
* Plain tensors that are shards (FSDP1 flat parameters, hand-made shards): the optimizer's
  ``shard_group`` (a process group, or True for the default one) says where to sum.

Unsharded, replicated parameters (plain DDP) have no reduction group: each replica keeps its own
norm, the paper's per-replica perturbation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from samkit.optim import _functional as F

try:  # torch.distributed.tensor is absent from builds without distributed support
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "CLIP_EPS",
    "ReduceKey",
    "clip_coefficient",
    "clip_grads_",
    "global_dot",
    "global_norm",
    "guarded_step",
    "is_dtensor",
    "is_finite",
    "local",
    "norm_value",
    "reduce_key",
    "reduce_keys",
    "scale_",
]

#: The process groups (``None`` = the default group) to sum a parameter's squared norm over.
ReduceKey = tuple[Any, ...]

#: Added to the norm in the clipping coefficient ``max_norm / (norm + CLIP_EPS)``.
CLIP_EPS = 1e-6


# -- sharded global norms ------------------------------------------------------------------------


def is_dtensor(t: Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (e.g. an FSDP2 parameter or gradient)."""
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
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """L2 norm of local ``tensors`` over every shard; ``keys[i]`` is ``tensors[i]``'s reduce key.
    Computed in ``dtype`` at least (float64: see :func:`norm_value`).

    ``all_keys`` (key -> device for its collective) must be the same on every rank, in the same
    order: each sharded key is all-reduced even when this rank has no tensor of it, so no rank
    waits for a collective another rank skipped. The result is float32 at least.
    """
    if not any(all_keys):  # nothing sharded: the plain, collective-free norm
        return F.global_norm(tensors, foreach=foreach, dtype=dtype)
    by_key: dict[ReduceKey, list[Tensor]] = {key: [] for key in all_keys}
    for t, key in zip(tensors, keys):
        by_key[key].append(t)
    total = None
    for key, group in by_key.items():
        squared = F.global_norm(group, foreach=foreach, dtype=dtype)
        squared = squared.to(all_keys[key], torch.float64).square()
        for process_group in key:
            dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=process_group)
        total = squared if total is None else total + squared.to(total.device)
    dtype = max(
        (torch.promote_types(t.dtype, dtype) for t in tensors),
        key=lambda d: torch.finfo(d).bits,
        default=torch.float32,
    )
    return total.sqrt().to(dtype)


def global_dot(
    a: list[Tensor],
    b: list[Tensor],
    keys: list[ReduceKey],
    all_keys: dict[ReduceKey, torch.device],
) -> Tensor:
    """``<a, b>`` of two lists of local tensors seen as one vector each, summed over every shard
    (the reduction of :func:`global_norm`), in float64 on the first key's device."""
    by_key: dict[ReduceKey, list[Tensor]] = {key: [] for key in all_keys}
    for x, y, key in zip(a, b, keys):
        by_key[key].append((x.double() * y.double()).sum())
    total = None
    for key, parts in by_key.items():
        device = all_keys[key]
        local = torch.stack(parts).sum().to(device) if parts else torch.zeros((), device=device)
        local = local.to(torch.float64)
        for process_group in key:
            dist.all_reduce(local, op=dist.ReduceOp.SUM, group=process_group)
        total = local if total is None else total + local.to(total.device)
    return total if total is not None else torch.zeros((), dtype=torch.float64)


def norm_value(compute: Callable[[torch.dtype], Tensor]) -> tuple[Tensor, float]:
    """``(norm, its value)`` from ``compute(dtype)``: in float32, and again in float64 only when
    that overflows (a finite gradient of norm above ~1.8e19 is then not taken for a non-finite
    one). One device sync in the normal case."""
    norm = compute(torch.float32)
    value = norm.item()
    if math.isinf(value):
        norm = compute(torch.float64)
        value = norm.item()
    return norm, value


# -- finiteness, scaling, clipping ---------------------------------------------------------------


def is_finite(value: Tensor | float) -> bool:
    """True when ``value`` (a number or a one-element tensor, e.g. a norm) is finite.

    For a tensor this reads it back to the host: one device sync."""
    if isinstance(value, Tensor):
        value = value.item()
    return math.isfinite(value)


def scale_(tensors: list[Tensor], factor: float, *, foreach: bool = True) -> None:
    """Multiply every tensor in place by ``factor`` (fused multi-tensor kernel when ``foreach``)."""
    F.scale_(tensors, factor, foreach=foreach)


def clip_coefficient(norm: float, max_norm: float | None) -> float | None:
    """The factor ``max_norm / (norm + CLIP_EPS)`` that clips a gradient of global norm ``norm``,
    or None when no clipping is needed (``max_norm`` None, or ``norm <= max_norm``)."""
    if max_norm is None or not norm > max_norm:
        return None
    return max_norm / (norm + CLIP_EPS)


def clip_grads_(
    grads: list[Tensor], norm: float, max_norm: float | None, *, foreach: bool = True
) -> float | None:
    """Clip ``grads`` (whose global norm is ``norm``) in place to norm ``max_norm``.

    Returns the coefficient applied, or None when the gradients were left alone."""
    coef = clip_coefficient(norm, max_norm)
    if coef is not None:
        F.scale_(grads, coef, foreach=foreach)
    return coef


# -- the guarded step ----------------------------------------------------------------------------


def guarded_step(
    step: Callable[[], object],
    grads: list[Tensor],
    grad_norm: Tensor | float,
    *,
    max_grad_norm: float | None = None,
    failed_pass: str | None = None,
    this_pass: str | None = None,
    agree: Callable[[bool], bool] | None = None,
    owner: str,
    skipped_before: int,
    foreach: bool = True,
    stacklevel: int = 2,
) -> bool:
    """Clip ``grads`` and call ``step()``; or, on a non-finite gradient, skip it with a warning.

    ``grad_norm`` is the global norm of ``grads`` (this rank's shards of the gradients ``step``
    uses). The step is skipped (``step`` not called, ``grads`` untouched, a ``RuntimeWarning``
    issued) when ``failed_pass`` names an earlier pass of this step that already failed, or when
    ``grad_norm`` is not finite. Otherwise, if ``max_grad_norm`` is given and
    ``grad_norm > max_grad_norm``, ``grads`` are first scaled in place by
    ``max_grad_norm / (grad_norm + CLIP_EPS)``.

    * ``this_pass`` names the pass that produced ``grads`` (e.g. ``"second"``), for the warning.
    * ``agree(ok) -> ok``, if given, turns this rank's verdict into the one every rank takes (an
      all-reduce), so data-parallel replicas skip together.
    * ``owner`` names the optimizer or helper in the warning; ``skipped_before`` is how many steps
      it skipped before this one. The caller keeps the count: one more when this returns False.
    * ``stacklevel`` is as for a ``warnings.warn`` issued by the caller of this function.

    Returns True when ``step()`` ran. Reads ``grad_norm`` back to the host once (one sync).
    """
    norm_value = grad_norm.item() if isinstance(grad_norm, Tensor) else float(grad_norm)
    ok = failed_pass is None and math.isfinite(norm_value)
    if agree is not None:
        ok = agree(ok)
    if not ok:
        failed = failed_pass or this_pass
        where = f" in the {failed} pass" if failed else ""
        warnings.warn(
            f"{owner}: non-finite gradient{where}; step skipped, weights and optimizer state "
            f"unchanged ({skipped_before + 1} skipped so far)",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
        return False
    clip_grads_(grads, norm_value, max_grad_norm, foreach=foreach)
    step()
    return True
