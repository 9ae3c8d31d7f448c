"""Hessian-vector products of the mean loss over fixed batches, the operator behind Lanczos, power
iteration and SLQ (:mod:`samkit.analysis.hessian`).

The loss is the mean over a FIXED list of batches, evaluated with the model in eval mode (BatchNorm
uses its running statistics, dropout is off), so the operator is deterministic and symmetric::

    L(w) = sum_b (n_b / N) * loss_fn(model(x_b; w), y_b),     N = sum_b n_b
    H v  = d/dw <grad L(w), v>                                 (double backprop, Pearlmutter 1994)

How it is computed, and what it costs. ``H v`` is the gradient of ``<g(w), v>``, where ``g`` is
the gradient computed by a backward pass that records its own graph (``create_graph=True``). That
first-order graph (a forward pass and a backward pass) does not depend on ``v``: the operator
builds it once per batch, on the first call, and KEEPS it, so every further product is only the
backward pass of ``<g, v>`` through it, instead of the forward, the first backward and that
backward again. ``benchmarks/analysis_cost.py`` measures a product in forward+backward passes
on the main job's model, this way, the rebuilding way, and by forward-over-reverse
(``torch.func.jvp`` of ``torch.func.grad``, which has to recompute the first-order pass too);
``benchmarks/README.md`` has the numbers. The products are the same as when the graph is rebuilt
every time, bit for bit: the same operations run on the same tensors.

The kept graphs cost memory (the tensors autograd saves for a forward and a backward pass, counted
by ``saved_tensors_hooks`` as they are built; ``kept_bytes``): batches are kept in order while
they fit in ``graph_memory`` bytes, and the others are rebuilt at every product. If the weights or
buffers change in place (their ``_version`` counters), the kept graphs are dropped and rebuilt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
from torch import Tensor

from samkit.analysis._utils import (
    Batch,
    LossFn,
    as_batch_list,
    batch_weights,
    eval_mode,
    flatten,
    mean_loss,
    to_device,
    trainable_parameters,
    unflatten,
)
from samkit.analysis._utils import batch_size as examples

__all__ = ["DEFAULT_GRAPH_MEMORY", "HessianOperator", "rebatch"]

#: Bytes of first-order graphs a :class:`HessianOperator` keeps by default (2 GiB).
DEFAULT_GRAPH_MEMORY = 2 * 2**30
#: Examples of the first batch whose first-order graph is measured to size ``batch_size="auto"``.
PROBE_EXAMPLES = 16


def rebatch(batches: Sequence[tuple[Any, Any]], size: int) -> list[tuple[Any, Any]]:
    """The same examples in the same order, in ``ceil(N / size)`` batches of nearly equal sizes
    (at most ``size``; ``torch.tensor_split``). Inputs and targets must be tensors. Batches that
    already have those sizes are returned as they are."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    n = sum(examples(b) for b in batches)
    k = -(-n // size)
    if [examples(b) for b in batches] == [n // k + (i < n % k) for i in range(k)]:
        return list(batches)
    if not all(isinstance(b[0], Tensor) and isinstance(b[1], Tensor) for b in batches):
        raise TypeError("rebatching needs tensor inputs and targets")
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return list(zip(torch.tensor_split(x, k), torch.tensor_split(y, k), strict=True))


class _SavedBytes:
    """``saved_tensors_hooks`` that add up the bytes of the distinct storages autograd saves,
    leaving out ``exclude`` (the parameters, which are not copies)."""

    def __init__(self, exclude: Sequence[Tensor]) -> None:
        self.seen = {t.untyped_storage().data_ptr() for t in exclude}
        self.bytes = 0

    def pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return t

    @staticmethod
    def unpack(t: Tensor) -> Tensor:
        return t


class HessianOperator:
    """``v -> H v`` for the Hessian of the mean loss over fixed batches (double backprop).

    ``H v = sum_b (n_b / N) * grad_w <grad_w loss_b(w), v>``: for each batch the gradient is built
    with ``create_graph=True`` (once, then kept, see the module docstring), dotted with ``v`` and
    differentiated again. The model runs in eval mode during every call (its per-module
    ``training`` flags are restored afterwards); ``.grad`` fields are never touched. ``v`` may
    have any floating dtype / device: it is cast to the parameters' and the result is returned in
    ``v``'s dtype and device.

    Args:
        model: the network; its trainable parameters (``requires_grad``) span the Hessian, in
            ``model.parameters()`` order, unless ``params`` is given.
        loss_fn: ``loss_fn(model(x), y)`` -> the mean loss of the batch.
        batches: ``(x, y)`` pairs (a list or any iterable, materialised once). Tensors are moved
            to the parameters' device on use.
        params: restrict the Hessian to these parameters (default: all trainable ones).
        graph_memory: bytes of first-order graphs to keep between calls (default 2 GiB; 0 keeps
            none and rebuilds every graph at every call, the slower way to the same numbers).
        batch_size: None (default): the batches as given. An int: the same examples re-cut into
            batches of at most that size (:func:`rebatch`). ``"auto"``: as few batches as
            ``graph_memory`` allows, sized from the graph of :data:`PROBE_EXAMPLES` examples
            (all in one batch when their graphs fit). Fewer, larger batches run fewer, larger
            operations: on a busy machine with several threads much faster; the products change
            only by the order of the sums over examples (float round-off).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Batch],
        params: Iterable[Tensor] | None = None,
        *,
        graph_memory: int = DEFAULT_GRAPH_MEMORY,
        batch_size: int | Literal["auto"] | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.batches = as_batch_list(batches)
        self.params = list(params) if params is not None else trainable_parameters(model)
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.dim = sum(p.numel() for p in self.params)
        self.num_examples = sum(examples(b) for b in self.batches)
        self.graph_memory = graph_memory
        if batch_size == "auto":
            batch_size = self._auto_batch_size()
        if batch_size is not None:
            self.batches = rebatch(self.batches, batch_size)
        self.weights = batch_weights(self.batches)
        self.num_calls = 0
        #: per batch: its kept first-order gradients (``None`` entries for unused parameters), or
        #: ``()`` for a batch whose gradient does not depend on the weights (``H = 0``).
        self._kept: list[tuple[Tensor | None, ...]] = []
        self.kept_bytes = 0
        self._filled = False  # whether the graphs to keep have been built
        self._versions: list[int] = []

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def batch_sizes(self) -> list[int]:
        return [examples(b) for b in self.batches]

    def _auto_batch_size(self) -> int:
        """The most examples whose first-order graph fits in ``graph_memory`` (2 GiB if 0)."""
        x, y = self.batches[0]
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError("batch_size='auto' needs tensor inputs and targets")
        m = min(PROBE_EXAMPLES, examples((x, y)))
        counter = _SavedBytes(self.params)
        hooks = torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack)
        with eval_mode(self.model), torch.enable_grad(), hooks:
            out = self.model(to_device(x[:m], self.device))
            loss = self.loss_fn(out, to_device(y[:m], self.device))
            torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        per_example = max(counter.bytes / m, 1.0)
        budget = self.graph_memory if self.graph_memory > 0 else DEFAULT_GRAPH_MEMORY
        return max(1, min(self.num_examples, int(budget // per_example)))

    @property
    def num_kept(self) -> int:
        """How many batches' first-order graphs are kept (the others are rebuilt at every call)."""
        return len(self._kept)

    def release(self) -> None:
        """Drop the kept graphs (they are rebuilt on the next call)."""
        self._kept, self.kept_bytes, self._filled, self._versions = [], 0, False, []

    def _state_versions(self) -> list[int]:
        return [t._version for t in (*self.params, *self.model.buffers())]

    def _first_order(self, b: int, measure: bool) -> tuple[tuple[Tensor | None, ...], int]:
        """Batch ``b``'s weighted gradient with its graph, and the bytes that graph holds."""
        (x, y), w = self.batches[b], self.weights[b]
        device = self.device
        counter = _SavedBytes(self.params)
        hooks = (
            torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack)
            if measure
            else contextlib.nullcontext()
        )
        with hooks:
            loss = self.loss_fn(self.model(to_device(x, device)), to_device(y, device)) * w
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        if not any(g is not None and g.requires_grad for g in grads):
            return (), 0  # the loss is linear in the parameters: H = 0 on this batch
        held = sum(g.numel() * g.element_size() for g in grads if g is not None)
        return grads, counter.bytes + held

    def _accumulate(
        self, out: list[Tensor], grads: tuple[Tensor | None, ...], vs: list[Tensor], keep: bool
    ) -> None:
        terms = [(g * u).sum() for g, u in zip(grads, vs) if g is not None]
        if not terms:
            return
        dot = torch.stack(terms).sum()
        if not dot.requires_grad:
            return
        hv = torch.autograd.grad(dot, self.params, retain_graph=keep, allow_unused=True)
        for acc, h in zip(out, hv):
            if h is not None:
                acc.add_(h)

    def __call__(self, v: Tensor) -> Tensor:
        if v.shape != (self.dim,):
            raise ValueError(f"expected a flat vector of shape ({self.dim},), got {tuple(v.shape)}")
        vs = [
            u.to(device=p.device, dtype=p.dtype)
            for u, p in zip(unflatten(v, self.params), self.params)
        ]
        out = [torch.zeros_like(p) for p in self.params]
        if self._filled and self._versions != self._state_versions():
            self.release()  # the weights or statistics changed in place: the graphs are stale
        filling = not self._filled and self.graph_memory > 0
        with eval_mode(self.model), torch.enable_grad():
            for b in range(len(self.batches)):
                if b < len(self._kept):
                    self._accumulate(out, self._kept[b], vs, keep=True)
                    continue
                grads, size = self._first_order(b, measure=filling)
                keep = (
                    filling and len(self._kept) == b and self.kept_bytes + size <= self.graph_memory
                )
                self._accumulate(out, grads, vs, keep=keep)
                if keep:
                    self._kept.append(grads)
                    self.kept_bytes += size
        if filling:
            self._filled, self._versions = True, self._state_versions()
        self.num_calls += 1
        return flatten(out).to(device=v.device, dtype=v.dtype)

    def loss(self) -> float:
        """The mean loss ``L(w)`` over the batches (eval mode)."""
        with eval_mode(self.model):
            return float(mean_loss(self.model, self.loss_fn, self.batches, self.weights))

    def gradient(self) -> Tensor:
        """The flat gradient ``grad L(w)`` over the batches (eval mode), detached."""
        out = [torch.zeros_like(p) for p in self.params]
        device = self.device
        with eval_mode(self.model), torch.enable_grad():
            for (x, y), w in zip(self.batches, self.weights):
                loss = self.loss_fn(self.model(to_device(x, device)), to_device(y, device)) * w
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                for acc, g in zip(out, grads):
                    if g is not None:
                        acc.add_(g)
        return flatten(out)
