"""The per-step bookkeeping of the sharpness-aware optimizers, done once and reused.

A SAM step visits every parameter five times (ascent norm, backup, perturbation, restore, second
norm). Written as per-tensor Python (a list comprehension, a dict lookup keyed by the tensor, a
dtype promotion, a shard check per visit) that is a few dozen interpreter operations per
parameter and step, a cost of its own on a model with many small tensors (issue 14: on 121
tensors of ~4k elements, first_step + second_step went from 2.7 to 2.1 ms of CPU time with warm
caches once it was gone). So:

* :class:`StepPlan`: the parameters that have a gradient in a pass, per param group, and what the
  step needs about them (this rank's shards, their reduce keys, whether they share one dtype and
  device, their backup slots), worked out when the set changes, not at every step.
* :class:`FlatStore`: the clean-weight backup as one contiguous buffer per (device, dtype) with a
  view per parameter, as fused optimizers and apex keep their state. When the parameters
  themselves lie back to back in one storage (e.g. flattened by the user), backup and restore are
  one copy each instead of one per tensor. For ``flat=True``'s buffers (``swap``) each has a
  backup storage of its own, and the final restore exchanges the two storages' memory instead of
  copying (:meth:`StepPlan.restore`).

Gradients are not flattened: autograd allocates each ``.grad`` (and ``zero_grad`` frees it), so a
flat gradient buffer would cost a copy per step; the gradient work stays one multi-tensor
(``torch._foreach_*``) kernel per operation over a list built once per pass.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from samkit.optim import _functional as F
from samkit.optim import numerics

_dtype = attrgetter("dtype")
_grad = attrgetter("grad")


class FlatStore:
    """One contiguous buffer per (device, dtype) holding a slot for each member tensor.

    Members join when first needed (the parameters that ever had a gradient, as before: frozen
    or unused ones cost no memory); the buffers are then reallocated, which only happens between
    steps (``generation`` counts it, so plans know their views are stale).
    """

    def __init__(self, *, swap: bool = False) -> None:
        # swap: members are whole storages (flat=True's buffers), each backed up in a storage
        # of its own, so that a restore may exchange the two instead of copying
        self.swap = swap and hasattr(torch.UntypedStorage, "_swap_data_ptr_")
        self._meta: dict[Tensor, tuple[Any, ...]] = {}  # member -> its shard's layout
        self._views: dict[Tensor, Tensor] = {}
        self._spans: dict[tuple[Any, ...], tuple[Tensor, list[Tensor]]] = {}
        self.generation = 0

    def views(self, params: list[Tensor], shards: list[Tensor]) -> list[Tensor]:
        """A slot shaped (and strided) like each ``shards[i]``, the tensor kept for
        ``params[i]``; reallocates the buffers if a parameter is new or changed layout."""
        changed = False
        for p, s in zip(params, shards):
            meta = (s.device, s.dtype, s.shape, s.stride())
            if self._meta.get(p) != meta:
                self._meta[p] = meta
                changed = True
        if changed:
            self._allocate()
        return [self._views[p] for p in params]

    def slot(self, param: Tensor) -> Tensor:
        """The slot of a member."""
        return self._views[param]

    def span(self, key: tuple[torch.device, torch.dtype]) -> tuple[Tensor, list[Tensor]]:
        """The whole buffer of one (device, dtype) and its members, in buffer order."""
        return self._spans[key]

    def numel(self) -> int:
        """Elements held, over all buffers."""
        return sum(flat.numel() for flat, _ in self._spans.values())

    def _allocate(self) -> None:
        by_key: dict[tuple[Any, ...], list[Tensor]] = {}
        for p, (device, dtype, _, _) in self._meta.items():
            # swap: a storage per member, to exchange with the member's (StepPlan.restore)
            key = (device, dtype, id(p)) if self.swap else (device, dtype)
            by_key.setdefault(key, []).append(p)
        self._views, self._spans = {}, {}
        for key, members in by_key.items():
            device, dtype = key[0], key[1]
            sizes = [_span(self._meta[p][2], self._meta[p][3]) for p in members]
            flat = torch.empty(sum(sizes), device=device, dtype=dtype)
            offset = 0
            for p, size in zip(members, sizes):
                _, _, shape, stride = self._meta[p]
                # the parameter's own strides (channels_last stays channels_last), so the copies
                # in and out are plain elementwise copies
                self._views[p] = flat.as_strided(shape, stride, offset)
                offset += size
            self._spans[key] = (flat, members)
        self.generation += 1


def _whole(t: Tensor) -> bool:
    """``t`` is its storage, all of it, in order (the storage holds nothing else)."""
    nbytes = t.numel() * t.element_size()
    return t.storage_offset() == 0 and t.is_contiguous() and t.untyped_storage().nbytes() == nbytes


def _span(shape: torch.Size, stride: tuple[int, ...]) -> int:
    """Elements a tensor of this shape and stride reaches from its first one (its numel when it is
    dense; more for a strided view; broadcast strides of 0 reach fewer)."""
    if any(n == 0 for n in shape):
        return 0
    return 1 + sum((n - 1) * abs(s) for n, s in zip(shape, stride))


class StepPlan:
    """The parameters that have a gradient in one pass and what a step needs about them.

    Built from ``groups`` (``(param_group, [params with a gradient])``, empty groups left out);
    reusable while :meth:`valid` (the same tensors in the same storage and dtype). DTensor
    parameters (FSDP2) are never reused: their local shards are re-read at every step. A
    ``fast`` plan also copies flat parameters in one piece (the per-tensor path, the reference,
    copies tensor by tensor).
    """

    def __init__(
        self,
        groups: list[tuple[dict[str, Any], list[Tensor]]],
        reduce_keys: tuple[dict[Tensor, numerics.ReduceKey], dict[numerics.ReduceKey, Any]],
        store: FlatStore,
        *,
        fast: bool = True,
    ) -> None:
        self.groups = groups
        self.fast = fast
        self.params = [p for _, ps in groups for p in ps]
        self.spans: list[slice] = []
        start = 0
        for _, ps in groups:
            self.spans.append(slice(start, start + len(ps)))
            start += len(ps)
        self.dtensor = any(numerics.is_dtensor(p) for p in self.params)
        self.dense = not any(p.is_sparse for p in self.params)
        # the reduce keys of ALL the optimizer's parameters: every rank runs the collectives of
        # every sharded key, even one none of its gradients has (numerics.global_norm)
        key_of, self.devices = reduce_keys
        self.keys = [key_of[p] for p in self.params]
        self.sharded = any(self.devices)
        self._shards = None if self.dtensor else self.params
        self.uniform = not self.dtensor and len({(p.device, p.dtype) for p in self.params}) == 1
        reused = fast and not self.dtensor  # what valid() compares is only needed then
        self._ptrs = list(map(Tensor.data_ptr, self.params)) if reused else []
        self._dtypes = list(map(_dtype, self.params)) if reused else []
        self._store = store
        self._backups: list[Tensor] | None = None
        self._generation = -1
        self._flat: list[tuple[Tensor, Tensor]] | None = None

    def valid(self) -> bool:
        """Still describes the parameters (none re-pointed to other storage or another dtype,
        e.g. by ``model.to(...)`` since the plan was made)."""
        return (
            self.fast
            and not self.dtensor
            and list(map(Tensor.data_ptr, self.params)) == self._ptrs
            and list(map(_dtype, self.params)) == self._dtypes
        )

    def shards(self) -> list[Tensor]:
        """This rank's part of each parameter (the parameter itself unless it is a DTensor)."""
        if self._shards is not None:
            return self._shards
        return [numerics.local(p) for p in self.params]

    def grads(self, *, zeros_for_missing: bool = False) -> list[Tensor]:
        """This rank's part of each gradient; zeros where a parameter lost its gradient (only
        with ``zeros_for_missing``: an ascent step after the first)."""
        grads = list(map(_grad, self.params))
        if zeros_for_missing or self.dtensor:
            shards = self.shards()
            grads = [
                numerics.local(g) if g is not None else torch.zeros_like(s)
                for g, s in zip(grads, shards)
            ]
        return grads

    def norm(self, tensors: list[Tensor], foreach: bool, dtype: torch.dtype) -> Tensor:
        """The global L2 norm of ``tensors`` (one per parameter, in order), over all shards."""
        if self.fast and self.uniform and not self.sharded and tensors:  # nothing to regroup
            return F.uniform_norm(tensors, foreach=foreach, dtype=dtype)
        return numerics.global_norm(tensors, self.keys, self.devices, foreach=foreach, dtype=dtype)

    def norm_value(self, tensors: list[Tensor], foreach: bool) -> tuple[Tensor, float]:
        """:meth:`norm` and its value, in float64 only if float32 overflows (one sync)."""
        return numerics.norm_value(lambda dtype: self.norm(tensors, foreach, dtype))

    def backups(self) -> list[Tensor]:
        """The slot of each parameter's clean copy in the store."""
        if self._backups is None or self._generation != self._store.generation:
            self._backups = self._store.views(self.params, self.shards())
            self._generation = self._store.generation
            self._flat = self._flat_pairs() if self.fast else None
        return self._backups

    def save(self, foreach: bool) -> None:
        """Copy the current (clean) weights into their slots."""
        backups = self.backups()
        if self._flat is not None:
            for buffer, span in self._flat:
                buffer.copy_(span)
        else:
            F.copy_(backups, self.shards(), foreach=foreach)

    def restore(self, foreach: bool, *, final: bool = False) -> None:
        """Copy the saved weights back, in place: bit for bit what :meth:`save` copied.

        ``final`` (the backup is not read again before the next :meth:`save`): where each
        parameter storage is whole and one of the store's, the two storages exchange their
        memory instead (every view follows; no copy, the same bits), the way torch's CUDA-graph
        trees swap storages; the versions are bumped as a copy would."""
        backups = self.backups()
        if final and self._store.swap and self._flat is not None:
            for buffer, span in self._flat:
                span.untyped_storage()._swap_data_ptr_(buffer.untyped_storage())
                torch.autograd.graph.increment_version(span)
            self._ptrs = list(map(Tensor.data_ptr, self.params))  # still valid()
        elif self._flat is not None:
            for buffer, span in self._flat:
                span.copy_(buffer)
        else:
            F.copy_(self.shards(), backups, foreach=foreach)

    def _flat_pairs(self) -> list[tuple[Tensor, Tensor]] | None:
        """(store buffer, parameter storage span) pairs when, for each (device, dtype), the
        parameters are exactly the buffer's members, each dense, back to back in one storage in
        the buffer's order, so that one copy moves them all; else None (a copy per tensor)."""
        if self.dtensor or not self.params:
            return None
        if self._store.swap:  # a storage per parameter (flat=True's buffers): pairs of whole ones
            pairs = [(self._store.slot(p), p.detach()) for p in self.params]
            return pairs if all(_whole(t) for pair in pairs for t in pair) else None
        pairs, covered = [], 0
        for key in dict.fromkeys((p.device, p.dtype) for p in self.params):
            buffer, members = self._store.span(key)
            storage = members[0].untyped_storage().data_ptr()
            base = members[0].storage_offset()
            for m in members:
                slot = self._store.slot(m)
                if (
                    m.untyped_storage().data_ptr() != storage
                    or m.storage_offset() - base != slot.storage_offset()
                    or m.stride() != slot.stride()
                    or _span(m.shape, m.stride()) != m.numel()  # gaps could hold other data
                ):
                    return None
            pairs.append((buffer, members[0].detach().as_strided((buffer.numel(),), (1,), base)))
            covered += len(members)
        # every member is a parameter of this plan (they are distinct), so the spans hold
        # exactly the plan's parameters
        return pairs if covered == len(self.params) else None
