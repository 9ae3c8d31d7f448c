"""Tensor-list primitives with a ``foreach`` fast path beside a plain loop.

The sharpness-aware optimizers are written once against these helpers; ``foreach=True`` runs
them as fused multi-tensor kernels (one launch per op on CUDA, less Python on CPU), ``False``
as a per-tensor loop, which is the reference the fast path is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def global_norm(
    tensors: list[Tensor], *, foreach: bool, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The L2 norm of all ``tensors`` seen as one vector, computed in ``dtype`` at least (the
    default float32 is fp16/bf16 safe; float64 for norms beyond float32's ~1.8e19)."""
    if not tensors:
        return torch.zeros((), dtype=dtype)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(torch.promote_types(t.dtype, dtype), []).append(t)
    norms: list[Tensor] = []
    for dtype, group in by_dtype.items():
        if foreach:
            norms.extend(torch._foreach_norm(group, 2, dtype=dtype))
        else:
            norms.extend(torch.linalg.vector_norm(t, 2, dtype=dtype) for t in group)
    if len(norms) == 1:  # one tensor (e.g. a flat=True buffer): its norm, not sqrt(norm ** 2)
        return norms[0]
    device = norms[0].device
    dtype = max((n.dtype for n in norms), key=lambda d: torch.finfo(d).bits)
    return torch.linalg.vector_norm(torch.stack([n.to(device, dtype) for n in norms]), 2)


def uniform_norm(
    tensors: list[Tensor], *, foreach: bool, dtype: torch.dtype = torch.float32
) -> Tensor:
    """:func:`global_norm` of non-empty ``tensors`` that share one dtype and device (the caller
    knows): the same kernels in the same order, without regrouping them tensor by tensor."""
    dtype = torch.promote_types(tensors[0].dtype, dtype)
    if foreach:
        norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    else:
        norms = [torch.linalg.vector_norm(t, 2, dtype=dtype) for t in tensors]
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), 2)


def mul(tensors: list[Tensor], others: list[Tensor], *, foreach: bool) -> list[Tensor]:
    if foreach:
        return list(torch._foreach_mul(tensors, others))
    return [t * o for t, o in zip(tensors, others)]


def scaled(tensors: list[Tensor], scalar: float, *, foreach: bool) -> list[Tensor]:
    if foreach:
        return list(torch._foreach_mul(tensors, scalar))
    return [t * scalar for t in tensors]


def scale_(tensors: list[Tensor], scalar: float, *, foreach: bool) -> None:
    if foreach:
        torch._foreach_mul_(tensors, scalar)
    else:
        for t in tensors:
            t.mul_(scalar)


def add_(tensors: list[Tensor], others: list[Tensor], *, alpha: float = 1.0, foreach: bool) -> None:
    if foreach:
        torch._foreach_add_(tensors, others, alpha=alpha)
    else:
        for t, o in zip(tensors, others):
            t.add_(o, alpha=alpha)


def addcmul_(
    tensors: list[Tensor], a: list[Tensor], b: list[Tensor], *, value: float, foreach: bool
) -> None:
    """``t += value * a * b`` for each triple."""
    if foreach:
        torch._foreach_addcmul_(tensors, a, b, value=value)
    else:
        for t, x, y in zip(tensors, a, b):
            t.addcmul_(x, y, value=value)


def copy_(dst: list[Tensor], src: list[Tensor], *, foreach: bool) -> None:
    if foreach:
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def sign(tensors: list[Tensor], *, foreach: bool) -> list[Tensor]:
    if foreach:
        return list(torch._foreach_sign(tensors))
    return [t.sign() for t in tensors]


def abs_plus(tensors: list[Tensor], eta: float, *, foreach: bool) -> list[Tensor]:
    """``|t| + eta`` for each tensor: the ASAM scaling operator T."""
    if foreach:
        out = torch._foreach_abs(tensors)
        torch._foreach_add_(out, eta)
        return list(out)
    return [t.abs().add_(eta) for t in tensors]


def project_to_unit_ball_(
    ys: list[Tensor], norm: float, global_norm: Callable[..., Tensor], foreach: bool
) -> None:
    """Project ``ys`` (one vector) onto the unit ball of the p-norm, p = 2 or inf, in place.

    ``global_norm(tensors, foreach, dtype)`` is the 2-norm of all of them (summed over shards)."""
    if norm == 2.0:
        y_norm = global_norm(ys, foreach, torch.float32).item()
        if y_norm > 1.0:
            scale_(ys, 1.0 / y_norm, foreach=foreach)
    else:
        for y in ys:
            y.clamp_(-1.0, 1.0)
