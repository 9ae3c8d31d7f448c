"""``flat=True``: the parameters and their gradients in one contiguous buffer per param group,
device and dtype, so that a step is a few kernels whatever the number of parameter tensors.

On a model with many small tensors (a transformer's norms and biases) a SAM step costs more in
per-tensor dispatch than in arithmetic (issue 14: 121 tensors of at most 4,096 elements). Here,
as fused optimizers and apex do, each parameter's storage is moved into a slot of one flat buffer
(``p.data`` becomes a view; ``p`` stays the same object, so the model, its hooks and DDP are
untouched) and its gradient is bound to a slot of a twin buffer, into which autograd accumulates
in place. The optimizer then holds one *proxy* parameter per buffer (``param_groups`` lists the
proxies): the ascent, backup, restore, norms and the base optimizer's own step each run once per
buffer instead of once per tensor.

What keeps this exact:

* A gradient that is not in its slot (``model.zero_grad()`` freed it and a backward made a new
  one, or code assigned ``p.grad``) is copied into its slot right after autograd accumulates it
  (a post-accumulate-grad hook) and before the optimizer reads the proxies (:meth:`sync`). The
  copy goes into a fresh buffer: a gradient tensor someone else still holds is never written.
* ``optimizer.zero_grad()`` zeroes the buffers in place (``set_to_none`` is ignored: the slots
  must stay bound). A parameter that got no gradient then has a zero one, so the base optimizer
  still applies weight decay and momentum to it, as with ``zero_grad(set_to_none=False)``.
* A parameter moved out of its slot (``model.to(...)`` after building the optimizer) or frozen
  (``requires_grad=False``) is a clear error, never a silently stale buffer.
* ``state_dict()`` is per parameter, as without ``flat``: checkpoints move between the two modes.

Only optimizers whose update is elementwise may run on the buffers (SGD, Adam, AdamW, ...): a
per-tensor rule (LAMB, LARS, Adafactor) would see one tensor instead of many.
"""

from __future__ import annotations

import inspect
import operator
import weakref
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor, nn

from samkit.optim import numerics

_requires_grad = attrgetter("requires_grad")
_grad = attrgetter("grad")
#: Each flattened parameter's gradient hook, by id (a weak reference confirms the parameter): a
#: parameter flattened again (a new optimizer over the same model) drops the old buffer's hook.
#: Not an attribute of the parameter, which would make the model unpicklable.
_HOOKS: dict[int, tuple[weakref.ref, Any]] = {}

#: Base optimizers whose update is elementwise, so it is the same on a buffer as per tensor.
ELEMENTWISE_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
)


class _Buffer:
    """One proxy parameter: the members' slots in its weight buffer and gradient buffer."""

    def __init__(self, members: list[nn.Parameter]) -> None:
        self.members = members
        first = members[0]
        self.layout = []  # (offset, shape, stride) of each member's slot
        offset = 0
        for p in members:
            if p.numel() and _span(p.shape, p.stride()) != p.numel():
                raise ValueError(
                    f"flat=True needs dense parameters; one of shape {tuple(p.shape)} has strides "
                    f"{p.stride()} with gaps or overlaps (a view of another tensor?)"
                )
            self.layout.append((offset, p.shape, p.stride()))
            offset += p.numel()
        weights = torch.empty(offset, device=first.device, dtype=first.dtype)
        for p, slot in zip(members, self.slots(weights)):
            slot.copy_(p.detach())
            p.data = slot  # the same Parameter object, its storage now in the buffer
        self.proxy = nn.Parameter(weights)
        # where each member's data starts, by where the buffer's does: a restore may exchange
        # the buffer's memory with the backup's (_flat.StepPlan.restore), which moves them all
        self._weight_ptrs = {self.proxy.data_ptr(): list(map(Tensor.data_ptr, members))}
        self.bind(torch.zeros_like(weights))

    def slots(self, buffer: Tensor) -> list[Tensor]:
        return [buffer.as_strided(shape, stride, off) for off, shape, stride in self.layout]

    def bind(self, grads: Tensor) -> None:
        """Make ``grads`` the proxy's gradient and each member's gradient a view of its slot."""
        self.grads = grads
        self.proxy.grad = grads
        self.grad_slots = self.slots(grads)
        for p, slot in zip(self.members, self.grad_slots):
            p.grad = slot

    def bound(self) -> bool:
        """Every member's gradient is still its slot, and the proxy's the buffer (the same
        tensors: autograd and DDP accumulate and copy in place; any other gradient is another
        object, and code that walks the param groups may have set the proxy's to None)."""
        return self.proxy.grad is self.grads and all(
            map(operator.is_, map(_grad, self.members), self.grad_slots)
        )

    def check(self) -> None:
        """RuntimeError if a member left its weight slot or stopped requiring gradients."""
        if list(map(Tensor.data_ptr, self.members)) != self._expected_ptrs():
            raise RuntimeError(
                "flat=True: a parameter no longer lives in the optimizer's flat buffer (moved by "
                "model.to(...), load_state_dict(assign=True) or an assignment to p.data after the "
                "optimizer was built): build the optimizer after moving the model"
            )
        if not all(map(_requires_grad, self.members)):
            raise RuntimeError(
                "flat=True: a parameter was frozen (requires_grad=False) after the optimizer was "
                "built; its zero gradient would still get weight decay and momentum: build the "
                "optimizer over the trainable parameters only"
            )

    def _expected_ptrs(self) -> list[int]:
        base = self.proxy.data_ptr()
        if base not in self._weight_ptrs:
            first = next(iter(self._weight_ptrs))  # the buffer's first home
            shift = base - first
            self._weight_ptrs = {first: self._weight_ptrs[first]}  # two homes at most
            self._weight_ptrs[base] = [ptr + shift for ptr in self._weight_ptrs[first]]
        return self._weight_ptrs[base]

    def sync(self) -> None:
        """Put every member's current gradient in its slot (see the module docstring)."""
        self.check()
        if not self.bound():  # rare: no autograd context for the common case
            with torch.no_grad():
                self._rebind()

    def _rebind(self) -> None:
        if self.proxy.grad is not self.grads:
            # set to None by code walking the param groups: whether a backward has added to
            # the model's gradients since cannot be known, so refuse rather than guess
            raise RuntimeError(
                "flat=True: the gradient of an optimizer's flat buffer was replaced or set to "
                "None (by code walking optimizer.param_groups); zero the gradients with "
                "optimizer.zero_grad(), which keeps the model's gradients bound to the buffer"
            )
        grads = [p.grad for p in self.members]
        if any(g is not None and g.is_sparse for g in grads):
            raise ValueError("flat=True needs dense gradients (e.g. nn.Embedding(sparse=False))")
        adopted = self._adoptable(grads)
        if adopted is not None:  # e.g. a gradient sum a step helper put back: no copy needed
            self.bind(adopted)
            return
        fresh = torch.zeros_like(self.proxy)
        for g, slot in zip(grads, self.slots(fresh)):
            if g is not None:
                slot.copy_(g)
        self.bind(fresh)

    def _adoptable(self, grads: list[Tensor | None]) -> Tensor | None:
        """The buffer the gradients already lie in, slot for slot (views of an earlier buffer
        of this proxy), else None."""
        if any(g is None for g in grads):
            return None
        first = grads[0]
        storage, base = first.untyped_storage(), first.storage_offset()
        for g, (off, _shape, stride) in zip(grads, self.layout):
            if (
                g.untyped_storage().data_ptr() != storage.data_ptr()
                or g.storage_offset() - base != off
                or g.stride() != stride
            ):
                return None
        total = self.proxy.numel()
        if (base + total) * first.element_size() > storage.nbytes():
            return None
        return first.new_empty(0).set_(storage, base, (total,), (1,))

    def after_accumulate(self, index: int) -> None:
        """Post-accumulate-grad hook of member ``index``: a gradient outside its slot is moved
        in at once, so the proxy's gradient is current whoever reads it next."""
        grad = self.members[index].grad
        if grad is not None and grad is not self.grad_slots[index]:
            self.sync()

    def zero_grad(self, synced: bool = False) -> None:
        """``synced``: see :meth:`FlatParams.zero_grad` (only the proxy's gradient is checked)."""
        bound = self.proxy.grad is self.grads if synced else self.bound()
        if bound:  # only this buffer is written: nothing to check (sync() checks)
            self.grads.zero_()
        else:  # never write into a gradient tensor something else may still hold
            self.check()  # nor take the gradients of a parameter that has left (a stale optimizer)
            self.bind(torch.zeros_like(self.proxy))


class FlatParams:
    """The flat buffers of an optimizer's param groups (``flat=True``; module docstring)."""

    def __init__(self) -> None:
        self.buffers: dict[Tensor, _Buffer] = {}  # proxy -> its buffer
        self.group_members: list[list[nn.Parameter]] = []  # each group's parameters, in order

    def flatten_group(self, group: dict[str, Any]) -> None:
        """Replace ``group["params"]`` by one proxy per (device, dtype) of its parameters."""
        params = group["params"]
        if isinstance(params, set):  # as torch.optim: an order that differs between runs
            raise TypeError("optimizer parameters need to be organized in ordered collections")
        members = [params] if isinstance(params, Tensor) else list(params)
        for i, p in enumerate(members):
            if not isinstance(p, nn.Parameter) or not p.is_leaf or not p.requires_grad:
                raise ValueError(
                    f"flat=True needs trainable leaf parameters (nn.Parameter with requires_grad);"
                    f" parameter {i} of shape {tuple(p.shape)} is not one: leave it out of params"
                )
            if numerics.is_dtensor(p):
                raise ValueError("flat=True is not for sharded (DTensor / FSDP) parameters")
        held = {id(p) for m in self.group_members for p in m}
        if held & {id(p) for p in members} or len({id(p) for p in members}) < len(members):
            raise ValueError("some parameters appear in more than one parameter group")
        by_kind: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
        for p in members:
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        proxies = []
        for kind_members in by_kind.values():
            buffer = _Buffer(kind_members)
            for i, p in enumerate(kind_members):
                _replace_hook(p, _hook(buffer, i))
            self.buffers[buffer.proxy] = buffer
            proxies.append(buffer.proxy)
        group["params"] = proxies
        self.group_members.append(members)

    def bump_versions(self) -> None:
        """Count a write to the buffers as one to every member (their version counters are
        their own, not the buffers'), as an in-place update of each would."""
        for buffer in self.buffers.values():
            torch.autograd.graph.increment_version(buffer.members)

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the user gave, in order (not the proxies)."""
        return [p for members in self.group_members for p in members]

    def sync(self) -> None:
        for buffer in self.buffers.values():
            buffer.sync()

    def zero_grad(self, *, synced: bool = False) -> None:
        """``synced``: a :meth:`sync` in the same optimizer call found the members' gradients
        bound, and no code of the user's has run since: only the proxies' are checked."""
        for buffer in self.buffers.values():
            buffer.zero_grad(synced)

    def _slot_of(self) -> dict[Tensor, tuple[_Buffer, int]]:
        return {p: (b, i) for b in self.buffers.values() for i, p in enumerate(b.members)}

    def split_per_parameter(self, tensors: dict[Tensor, Tensor]) -> list[Tensor | None]:
        """A variant's per-proxy tensors (``tensors[proxy]``) as one per model parameter, in
        order (None where the proxy has none): the format without ``flat``."""
        out: list[Tensor | None] = []
        slot_of = self._slot_of()
        for p in self.parameters():
            buffer, i = slot_of[p]
            value = tensors.get(buffer.proxy)
            off, shape, stride = buffer.layout[i]
            out.append(
                None
                if value is None
                else value.as_strided(shape, stride, value.storage_offset() + off)
            )
        return out

    def gather_per_proxy(self, tensors: dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        """The inverse of :meth:`split_per_parameter` (``tensors`` by model parameter); a
        parameter without one gets zeros in its slot."""
        out = {}
        for proxy, buffer in self.buffers.items():
            values = [tensors.get(p) for p in buffer.members]
            if all(v is None for v in values):
                continue
            out[proxy] = torch.zeros_like(proxy, memory_format=torch.contiguous_format).detach()
            for v, slot in zip(values, buffer.slots(out[proxy])):
                if v is not None:
                    slot.copy_(v)
        return out

    def member_state_dict(self, state: dict[str, Any], proxies: list[Tensor]) -> dict[str, Any]:
        """The base optimizer's state dict over the proxies (``proxies[i]`` is index ``i``)
        rewritten per parameter, as the optimizer would have without ``flat``."""
        slot_of, index_of = self._slot_of(), {id(p): i for i, p in enumerate(proxies)}
        new_state, groups, index = {}, [], 0
        for group, members in zip(state["param_groups"], self.group_members):
            ids = []
            for p in members:
                buffer, i = slot_of[p]
                proxy_state = state["state"].get(index_of[id(buffer.proxy)])
                if proxy_state is not None:
                    off, shape, stride = buffer.layout[i]
                    new_state[index] = {
                        k: _split(v, buffer.proxy, off, shape, stride)
                        for k, v in proxy_state.items()
                    }
                ids.append(index)
                index += 1
            groups.append({**group, "params": ids})
        return {"state": new_state, "param_groups": groups}

    def proxy_state_dict(self, state: dict[str, Any], proxies: list[Tensor]) -> dict[str, Any]:
        """The inverse of :meth:`member_state_dict`: a per-parameter state dict (saved with or
        without ``flat``) gathered onto the proxies. A parameter without state gets zeros."""
        sizes = [len(m) for m in self.group_members]
        given = [len(g["params"]) for g in state["param_groups"]]
        if given != sizes:
            raise ValueError(
                f"the state dict has param groups of {given} parameters, this optimizer of "
                f"{sizes}: it was saved for another model or other param groups"
            )
        member_state = {}
        for group, members in zip(state["param_groups"], self.group_members):
            for i, p in zip(group["params"], members):
                if i in state["state"]:
                    member_state[p] = state["state"][i]
        proxy_index = {id(p): i for i, p in enumerate(proxies)}
        new_state = {}
        for proxy, buffer in self.buffers.items():
            saved = [member_state.get(p) for p in buffer.members]
            if all(s is None for s in saved):
                continue
            keys = dict.fromkeys(k for s in saved if s is not None for k in s)
            new_state[proxy_index[id(proxy)]] = {
                k: _gather(k, buffer, [None if s is None else s.get(k) for s in saved])
                for k in keys
            }
        groups, position = [], 0  # proxies are numbered group by group, as flatten_group made them
        for group, members in zip(state["param_groups"], self.group_members):
            n = len(dict.fromkeys((p.device, p.dtype) for p in members))
            groups.append({**group, "params": list(range(position, position + n))})
            position += n
        return {"state": new_state, "param_groups": groups}


def check_flat(base_optimizer: Any, shard_group: Any) -> None:
    """ValueError / TypeError when ``flat=True`` cannot give the per-tensor result."""
    if not isinstance(base_optimizer, type):
        raise TypeError(
            "flat=True builds the base optimizer on the flat buffers: pass its class (e.g. "
            "torch.optim.SGD) and its arguments, not an instance"
        )
    if not issubclass(base_optimizer, ELEMENTWISE_OPTIMIZERS):
        names = ", ".join(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)
        raise ValueError(
            f"flat=True runs the base optimizer on one buffer per param group, which gives the "
            f"per-tensor update only for elementwise optimizers ({names}); "
            f"{base_optimizer.__name__} is not one of them: leave flat=False"
        )
    if shard_group not in (None, False):
        raise ValueError("flat=True is not for sharded parameters (shard_group, FSDP)")


def flat_base_kwargs(base_optimizer: type, base_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The base optimizer's arguments on the buffers: ``foreach=False`` unless given, where it
    takes one (a tensor per buffer: nothing to batch, and torch's choice of a path at every
    step costs more than the step's arithmetic on a small model)."""
    if "foreach" in inspect.signature(base_optimizer.__init__).parameters:
        return {"foreach": False, **base_kwargs}
    return base_kwargs


def _hook(buffer: _Buffer, index: int) -> Any:
    """The gradient hook of member ``index``, through a weak reference: once the optimizer (and
    so its buffers) is gone, the parameter's later backward passes are left alone."""
    ref = weakref.ref(buffer)

    def hook(_: Tensor) -> None:
        live = ref()
        if live is not None:
            live.after_accumulate(index)

    return hook


def _replace_hook(param: Tensor, hook: Any) -> None:
    """Make ``hook`` the parameter's only flat-buffer gradient hook."""
    key = id(param)
    old = _HOOKS.pop(key, None)
    if old is not None and old[0]() is param:
        old[1].remove()
    handle = param.register_post_accumulate_grad_hook(hook)
    _HOOKS[key] = (weakref.ref(param, lambda _: _HOOKS.pop(key, None)), handle)


def _split(value: Any, proxy: Tensor, off: int, shape: torch.Size, stride: tuple[int, ...]) -> Any:
    """A member's part of one entry of a proxy's state: its slot of a buffer-shaped tensor
    (momentum, Adam moments), a copy of anything else (a step count)."""
    if isinstance(value, Tensor) and value.shape == proxy.shape and value.ndim == 1:
        return value.as_strided(shape, stride, value.storage_offset() + off)
    return value.clone() if isinstance(value, Tensor) else value


def _gather(key: str, buffer: _Buffer, values: list[Any]) -> Any:
    """One entry of a proxy's state from its members' (None: the member had none): a tensor
    shaped like each member (momentum, Adam moments) into the buffer, else the first value."""
    present = [(v, p) for v, p in zip(values, buffer.members) if v is not None]
    elementwise = key != "step" and all(
        isinstance(v, Tensor) and v.shape == p.shape for v, p in present
    )
    if elementwise:
        first = present[0][0]
        out = torch.zeros(buffer.proxy.shape, dtype=first.dtype, device=buffer.proxy.device)
        for v, slot in zip(values, buffer.slots(out)):
            if v is not None:
                slot.copy_(v)
        return out
    first = present[0][0]
    return first.clone() if isinstance(first, Tensor) else first


def _span(shape: torch.Size, stride: tuple[int, ...]) -> int:
    """Elements a tensor of this shape and stride reaches from its first one."""
    if any(n == 0 for n in shape):
        return 0
    return 1 + sum((n - 1) * abs(s) for n, s in zip(shape, stride))
