"""What every sharpness-aware optimizer shares: wrapping a base optimizer, restoring the clean
weights, the guarded base step, and checkpoints. The ascent itself lives in ``sam.py``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from samkit.optim import _conventions, numerics
from samkit.optim import _functional as F
from samkit.optim._flat import FlatStore, StepPlan
from samkit.optim._flat_params import FlatParams, check_flat, flat_base_kwargs

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]
_grad_is_sparse = attrgetter("grad.is_sparse")
_Method = TypeVar("_Method", bound=Callable[..., Any])

#: Attributes through which frameworks' optimizer wrappers hold the optimizer they wrap:
#: Accelerate's ``AcceleratedOptimizer.optimizer``, Lightning's ``LightningOptimizer._optimizer``.
WRAPPER_ATTRIBUTES = ("optimizer", "_optimizer")


def unwrap(optimizer: Any) -> Any:
    """The optimizer inside frameworks' wrappers (Accelerate, Lightning), or ``optimizer`` itself.

    Follows ``.optimizer`` / ``._optimizer`` while they lead to another ``torch.optim.Optimizer``
    (a samkit optimizer's ``base_optimizer`` is not followed: it is not a wrapper's)."""
    seen = set()
    while not isinstance(optimizer, SharpnessAwareOptimizer) and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = next(
            (
                v
                for v in (getattr(optimizer, a, None) for a in WRAPPER_ATTRIBUTES)
                if isinstance(v, Optimizer) or hasattr(v, "param_groups")
            ),
            None,
        )
        if inner is None:
            break
        optimizer = inner
    owner = getattr(optimizer, "_owner", None)
    return owner if isinstance(owner, SharpnessAwareOptimizer) else optimizer


def on_owner(method: _Method) -> _Method:
    """Run ``method`` on the optimizer object that owns the per-step bookkeeping.

    Lightning's ``LightningOptimizer`` is an instance of a subclass of the wrapped optimizer's
    class with its own ``__dict__`` (2.6: forwarding other attributes with ``__getattr__``; older
    releases: a shallow copy of the optimizer's): ``opt.first_step()`` on it would set the
    perturbed set, the failed pass and ``skipped_steps`` on the wrapper, and the real optimizer
    (which Lightning steps and checkpoints) would never see them. Every public method runs on the
    original instead: ``_owner`` is found on the wrapper by either route."""

    @functools.wraps(method)
    def run(self: SharpnessAwareOptimizer, *args: Any, **kwargs: Any) -> Any:
        return method(getattr(self, "_owner", self), *args, **kwargs)

    return run  # type: ignore[return-value]


#: Plans kept for reuse: the first and second pass usually have the same parameters (one plan);
#: a few more cover alternating sets without letting ESAM's random subsets pile up.
MAX_PLANS = 4


class SharpnessAwareOptimizer(Optimizer):
    """Base class: a perturb / restore / base-step cycle around a wrapped ``torch.optim`` optimizer.

    ``param_groups`` and ``state`` ARE the base optimizer's (not copies), so an LR scheduler
    attached to either object works and ``state_dict()`` carries momentum / Adam moments. The clean
    weights saved during a perturbation live in private buffers, never in ``state``.
    """

    #: ``torch.amp.GradScaler.step`` calls ``step()`` even after an overflow, with ``grad_scale``
    #: and ``found_inf`` set on the optimizer (the protocol of fused optimizers): a skipped step
    #: must still put the weights back from ``w + e``.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer] | Optimizer,
        defaults: dict[str, Any],
        foreach: bool | None,
        base_kwargs: dict[str, Any],
        shard_group: Any = None,
        flat: bool = False,
    ) -> None:
        self._flat = FlatParams() if flat else None  # flat=True: see samkit.optim._flat_params
        if flat:
            check_flat(base_optimizer, shard_group)
            base_kwargs = flat_base_kwargs(base_optimizer, base_kwargs)
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"keyword arguments {sorted(base_kwargs)} are for building the base optimizer; "
                    "pass an optimizer class, or drop them when passing an optimizer instance"
                )
            given_groups = _as_groups(params)
            own = [[id(p) for p in g["params"]] for g in base_optimizer.param_groups]
            given = [[id(p) for p in g["params"]] for g in given_groups]
            if {i for g in own for i in g} != {i for g in given for i in g}:
                raise ValueError("params must be the same parameters the base optimizer holds")
            if any(key in g for g in given_groups for key in defaults):
                if own != given:
                    raise ValueError(
                        f"per-group options ({', '.join(defaults)}) given with an optimizer "
                        "instance need the same param groups, in the same order, as that optimizer"
                    )
                for mine, theirs in zip(given_groups, base_optimizer.param_groups):
                    theirs.update({k: v for k, v in mine.items() if k in defaults})
            super().__init__(base_optimizer.param_groups, defaults)  # adds our keys in place
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            super().__init__(params, defaults)
            if self._flat is not None:
                for group in self.param_groups:
                    self._flat.flatten_group(group)
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
            if self._flat is not None:  # its own would set the proxies' gradients to None
                self.base_optimizer.zero_grad = self._flat.zero_grad  # type: ignore[method-assign]
        else:
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) "
                f"or an optimizer instance, got {base_optimizer!r}"
            )
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        # LR schedulers read the hyper-parameters here (OneCycleLR, CyclicLR look for momentum /
        # betas): the base optimizer's, plus ours.
        self.defaults = {**self.base_optimizer.defaults, **self.defaults}
        self.foreach = foreach
        if shard_group not in (None, False) and any(
            numerics.is_dtensor(p) for g in self.param_groups for p in g["params"]
        ):
            raise ValueError(
                "shard_group is for plain-tensor shards (FSDP1 flat parameters); DTensor "
                "parameters (FSDP2 fully_shard) carry their sharding and are reduced over their "
                "own mesh: leave shard_group None"
            )
        self.shard_group = shard_group
        self._owner = self  # survives a wrapper's copy of __dict__ (see on_owner)
        self._keys: tuple[dict[Tensor, Any], dict[Any, torch.device]] | None = None
        self._skipped_steps = 0
        self._last_grad_norm: Tensor | None = None
        self._store = FlatStore(swap=flat)  # the clean weights while perturbed (w + e)
        self._plans: dict[tuple[int, ...], StepPlan] = {}
        self._clean: dict[
            Tensor, Tensor
        ] = {}  # first-pass gradients, for the variants that keep them
        self._clean_params: set[Tensor] = set()
        self._perturbed: StepPlan | None = None  # the parameters now at w + e
        self._failed_pass: str | None = None
        self._awaiting_second_step = False  # first_step ran, second_step not yet
        self._ascent_skipped = False  # skip_ascent ran: this step is a plain base step
        self._decision: bool | None = None  # wants_ascent's answer for this step
        # the gradients step(closure) left behind last time, by id(param): (tensor, version);
        # any other gradient it finds at its start was accumulated elsewhere
        self._grad_marks: dict[int, tuple[Tensor, int]] = {}

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was non-finite (kept in ``state_dict``)."""
        return self._owner._skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._owner._skipped_steps = value

    @property
    def last_grad_norm(self) -> Tensor | None:
        """Global norm of the gradient of the last :meth:`second_step`, before clipping."""
        return self._owner._last_grad_norm

    @on_owner
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # during __init__
            return super().add_param_group(param_group)
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        if self._flat is not None:
            self._flat.flatten_group(param_group)
        self.base_optimizer.add_param_group(param_group)
        self._keys, self._plans = None, {}

    def _foreach(self, tensors: list[Tensor]) -> bool:
        use = True if self.foreach is None else self.foreach
        return use and bool(tensors) and not any(t.is_sparse for t in tensors)

    @property
    def failed_pass(self) -> str | None:
        """Which pass of the current step had a non-finite gradient (None: none so far)."""
        return self._owner._failed_pass

    @property
    def awaiting_second_step(self) -> bool:
        """True between :meth:`first_step` and :meth:`second_step`."""
        return self._owner._awaiting_second_step

    @on_owner
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; with ``flat=True`` the gradient buffers are
        zeroed in place whatever ``set_to_none`` says (the gradients stay views of them)."""
        if self._flat is None:
            super().zero_grad(set_to_none)
        else:
            self._flat.zero_grad()

    def _zero_grad_synced(self) -> None:
        """``zero_grad()`` at the end of a call whose ``_plan()`` synced the gradients."""
        if self._flat is None:
            self.zero_grad()
        else:
            self._flat.zero_grad(synced=True)

    @on_owner
    def sync_gradients(self) -> None:
        """``flat=True``: move gradients that are not in the flat buffers (assigned to ``p.grad``
        by hand, without a backward since) into them. Every method of the optimizer does this
        first; call it only before reading ``param_groups``' gradients yourself. No-op otherwise."""
        if self._flat is not None:
            self._flat.sync()

    @on_owner
    def trained_parameters(self) -> list[Tensor]:
        """The parameters this optimizer trains, in order: those of ``param_groups``, or with
        ``flat=True`` the model's parameters behind the flat buffers that ``param_groups`` hold."""
        if self._flat is not None:
            return self._flat.parameters()
        return [p for g in self.param_groups for p in g["params"]]

    @on_owner
    def fail_step(self, reason: str) -> None:
        """Mark the current step as failed, e.g. because another data-parallel replica's did.

        Call it between ``first_step`` and ``second_step``; ``second_step`` then skips."""
        self.unperturb()
        self._failed_pass = self._failed_pass or reason

    def _plan(self, perturbed_only: bool = False) -> StepPlan:
        """The parameters that have a gradient now, per param group (see ``_flat.StepPlan``);
        with ``perturbed_only``, only those of the groups that join the perturbation (the
        group option ``perturb``, SAM-ON).

        On the foreach path the plan is reused while the same parameters have gradients; with
        ``foreach=False`` it is made afresh at every pass, the per-tensor reference path."""
        if self._flat is not None:  # gradients assigned by hand since the last backward
            self._flat.sync()
        groups, ids = [], []
        for g in self.param_groups:
            if perturbed_only and not g.get("perturb", True):  # absent: a state dict from before
                continue
            params = [p for p in g["params"] if p.grad is not None]
            if params:
                groups.append((g, params))
                ids += (id(g), len(params), *map(id, params))
        if self.foreach is False:
            return StepPlan(groups, self._reduce_keys(), self._store, fast=False)
        key = tuple(ids)  # the plan holds these objects, so their ids stay theirs while cached
        plan = self._plans.get(key)
        if plan is None or not plan.valid():
            plan = StepPlan(groups, self._reduce_keys(), self._store)
            if not plan.dtensor:  # DTensor shards are re-read at every step
                if len(self._plans) >= MAX_PLANS:
                    self._plans.pop(next(iter(self._plans)))
                self._plans[key] = plan
        return plan

    def _plan_foreach(self, plan: StepPlan) -> bool:
        """Multi-tensor kernels for this plan's tensors (as ``_foreach``, decided once)."""
        return self.foreach is not False and plan.dense and bool(plan.params)

    def _save_clean(self, plan: StepPlan, foreach: bool) -> None:
        generation = self._store.generation
        plan.save(foreach)
        self._weights_written()  # the perturbation follows
        if self._store.generation != generation:  # the backup buffers were reallocated:
            # other plans' views point into the old ones; let them go (they will re-read theirs)
            self._plans = {k: v for k, v in self._plans.items() if v is plan}

    @on_owner
    @torch.no_grad()
    def unperturb(self) -> None:
        """Restore, in place, exactly the tensors that were perturbed (no-op when none)."""
        if self._restore():
            self._weights_written()

    def _restore(self) -> bool:
        """:meth:`unperturb` without the version bump; True if something was restored."""
        plan, self._perturbed = self._perturbed, None
        if plan is not None and plan.params:
            plan.restore(self._plan_foreach(plan), final=True)
            return True
        return False

    def _weights_written(self) -> None:
        """``flat=True``: bump the model parameters' versions, which writes to the buffers leave
        alone, so that autograd refuses a graph saved before them as it does per tensor."""
        if self._flat is not None:
            self._flat.bump_versions()

    # -- hooks of the SAM family (see samkit.optim.sam): each variant overrides one or two ------

    #: Variants that combine the clean and the perturbed gradient keep the clean one.
    stores_clean_gradient = False
    #: Variants with state from a step's first pass (a clean gradient, a moving average) take
    #: one first pass per step: no m-sharpness chunks, no accumulated micro-batches.
    one_first_pass_per_step = False
    #: Momentum-SAM: the weights are perturbed before the step's only pass (``pre_perturb``).
    perturbs_before_first_pass = False
    #: When to ascend (``samkit.optim.ascent_policy``); None: at every step.
    ascent_policy: Any = None

    def _rho_factor(self) -> float:
        """A factor on rho for this step (ESAM rescales its stochastic perturbation by 1/beta)."""
        return 1.0

    def _group_rho(self, group: dict[str, Any]) -> float:
        """rho of a param group for this step (GSAM schedules it with the learning rate)."""
        return group["rho"]

    def _ascent_gradients(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """The gradients the first ascent step follows (Friendly-SAM removes a component)."""
        return grads

    def _combine_gradients(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """Turn the second-pass gradients ``grads`` (local shards, in place) into the update's
        gradient, before clipping and the base step. SAM uses them as they are."""

    def _combine_without_ascent(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """As :meth:`_combine_gradients`, for a step without ascent (``skip_ascent``): ``grads``
        are the first pass's. The base optimizer's step on them as they are (LookSAM adds its
        stored component)."""

    def _after_step(self, took: bool) -> None:
        """Called at the end of :meth:`second_step` (``took``: the base step ran)."""

    def _store_clean_grads(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """Keep a copy of the first-pass (clean) gradients, for variants that combine them with
        the perturbed ones (:meth:`_clean_grads`)."""
        for p, g in zip(params, grads):
            if p not in self._clean or self._clean[p].shape != g.shape:
                self._clean[p] = torch.empty_like(g, memory_format=torch.preserve_format)
        F.copy_([self._clean[p] for p in params], grads, foreach=self._foreach(grads))
        self._clean_params = set(params)

    def _clean_grads(self, params: list[Tensor]) -> list[Tensor]:
        """The stored clean gradient of each of ``params`` (zeros for one that had none)."""
        return [
            self._clean[p] if p in self._clean_params else torch.zeros_like(g)
            for p, g in zip(params, (numerics.local(p.grad) for p in params))
        ]

    def _dot(self, a: list[Tensor], b: list[Tensor], params: list[Tensor]) -> float:
        """``<a, b>`` over all parameters (and shards) as one vector; ``a[i]`` belongs to
        ``params[i]``."""
        key_of, devices = self._reduce_keys()
        return numerics.global_dot(a, b, [key_of[p] for p in params], devices).item()

    def _local_grads(self) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters that have a gradient, and this rank's shard of each gradient."""
        plan = self._plan()
        return plan.params, plan.grads()

    def grad_norm(self) -> Tensor:
        """Global L2 norm (float32 at least) of the current gradients of all parameters."""
        plan = self._plan()
        return plan.norm(plan.grads(), self._plan_foreach(plan), torch.float32)

    def _reduce_keys(self) -> tuple[dict[Tensor, Any], dict[Any, torch.device]]:
        """Which process groups each parameter's norm (or dot product) is summed over."""
        if self._keys is None:
            params_all = [p for g in self.param_groups for p in g["params"]]
            self._keys = numerics.reduce_keys(params_all, self.shard_group)
        return self._keys

    @on_owner
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, max_grad_norm: float | None = None) -> bool:
        """Restore ``w`` and apply the base optimizer with the current (second-pass) gradient.

        ``max_grad_norm`` clips that gradient by its global norm first. Returns False, with a
        warning and ``skipped_steps += 1``, when a non-finite gradient in any pass skipped the step
        (see ``samkit.optim.numerics.guarded_step``).
        """
        if max_grad_norm is not None and not max_grad_norm > 0:  # nan, 0 and negatives
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        if not self._awaiting_second_step:
            raise RuntimeError(
                f"{type(self).__name__}.second_step() without first_step(): call first_step() "
                "after the first pass's backward (or use step(closure))"
            )
        self._restore()  # the versions are bumped once, after the base step
        self._awaiting_second_step = False
        plan = self._plan()
        _refuse_sparse(plan.params)
        grads = plan.grads()
        skipped = self._ascent_skipped
        if self._failed_pass is None:
            combine = self._combine_without_ascent if skipped else self._combine_gradients
            combine(plan.params, grads)
        foreach = self._plan_foreach(plan)
        grad_norm, norm_value = plan.norm_value(grads, foreach)  # the one sync
        self._last_grad_norm = grad_norm
        failed_pass, self._failed_pass = self._failed_pass, None
        took = numerics.guarded_step(
            self.base_optimizer.step,
            grads,
            norm_value,
            max_grad_norm=max_grad_norm,
            failed_pass=failed_pass,
            this_pass="first" if skipped else "second",
            owner=type(self).__name__,
            skipped_before=self.skipped_steps,
            foreach=foreach,
        )
        if took:
            self._opt_called = True  # tells an LR scheduler attached to this object a step ran
        else:
            self.skipped_steps += 1
        self._after_step(took)
        self._weights_written()
        if self.ascent_policy is not None:
            self.ascent_policy.step_done(took)
        self._ascent_skipped, self._decision = False, None
        if zero_grad:
            self._zero_grad_synced()
        return took

    @on_owner
    def wants_ascent(self, *, scaler: Any = None, average: Any = None) -> bool:
        """Whether this step takes SAM's ascent: ask after the first pass's backward, before
        ``first_step``. True without an ``ascent_policy``. The answer holds until the step ends.

        ``scaler``: the ``GradScaler`` whose scaled loss made the gradients (a policy that reads
        ``||g||`` unscales it); ``average(t) -> t``: the mean of a tensor over data-parallel
        replicas (the step helper passes one under DDP), so that every replica decides alike.
        On no, call :meth:`skip_ascent` then ``second_step()``: one pass, the base step on the
        first pass's gradient."""
        if self._decision is None:
            policy = self.ascent_policy
            grad_sq = functools.partial(self._grad_sq, scaler, average)
            self._decision = True if policy is None else bool(policy.decide(grad_sq))
        return self._decision

    def _grad_sq(self, scaler: Any, average: Any) -> float:
        """``||g||^2`` of the current (first-pass) gradients, unscaled, averaged by ``average``."""
        norm = self.grad_norm().to(torch.float64)
        if scaler is not None and scaler.is_enabled():
            norm = norm / scaler.get_scale()
        squared = norm.square().reshape(1)
        return float((average(squared) if average is not None else squared).item())

    @on_owner
    @torch.no_grad()
    def skip_ascent(self) -> None:
        """This step takes no ascent: the coming ``second_step()`` (or ``step()``) applies the
        base optimizer to the current gradients, the first pass's, with the same guards."""
        self.unperturb()
        self._failed_pass, self._awaiting_second_step = None, True
        self._ascent_skipped = True

    @property
    def ascent_skipped(self) -> bool:
        """True between :meth:`skip_ascent` and the end of that step."""
        return self._owner._ascent_skipped

    def _per_param_list(self, tensors: dict[Tensor, Tensor]) -> list[Tensor | None]:
        """``tensors`` (at most one per parameter: a variant's moving average, LookSAM's g_v) in
        the order of the param groups, for ``state_dict``; per model parameter with ``flat``."""
        if self._flat is not None:
            return self._flat.split_per_parameter(tensors)
        return [tensors.get(p) for g in self.param_groups for p in g["params"]]

    def _per_param_dict(self, saved: list[Tensor | None] | None) -> dict[Tensor, Tensor]:
        """The inverse of ``_per_param_list`` after ``load_state_dict``: each saved tensor
        copied to its parameter's device and dtype."""
        params = self.trained_parameters()
        saved = list(saved or [])
        if saved and len(saved) != len(params):
            raise ValueError(
                f"the state dict holds {len(saved)} per-parameter tensors of "
                f"{type(self).__name__}, this optimizer has {len(params)} parameters"
            )
        loaded = {
            p: v.to(device=p.device, dtype=p.dtype).clone()
            for p, v in zip(params, saved)
            if v is not None
        }
        return self._flat.gather_per_proxy(loaded) if self._flat is not None else loaded

    # -- how frameworks call it (samkit.optim._conventions) ------------------------------------

    def _finish_step(self, closure: Callable[[], Any] | None) -> Any:
        return _conventions.finish_step(self, closure)

    def _unscale(self, plan: StepPlan | None, inverse_scale: float) -> None:
        _conventions.unscale(self, plan, inverse_scale)

    def _refuse_foreign_gradients(self) -> None:
        _conventions.refuse_foreign_gradients(self)

    def _mark_gradients(self) -> None:
        _conventions.mark_gradients(self)

    @on_owner
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict, plus samkit's counters under ``"samkit"``."""
        state = self.base_optimizer.state_dict()
        if self._flat is not None:  # per parameter, as without flat=True
            state = self._flat.member_state_dict(state, self._proxies())
        state["samkit"] = {"skipped_steps": self.skipped_steps}
        if self.ascent_policy is not None:
            state["samkit"]["ascent_policy"] = self.ascent_policy.state_dict()
        return state

    @on_owner
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("samkit", {})
        if self._flat is not None:
            state_dict = self._flat.proxy_state_dict(state_dict, self._proxies())
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._keys, self._plans = None, {}
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        if self.ascent_policy is not None and "ascent_policy" in extra:
            self.ascent_policy.load_state_dict(extra["ascent_policy"])

    def _proxies(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]


def _refuse_sparse(params: list[Tensor]) -> None:
    """ValueError if a parameter of ``params`` (all with a gradient) has a sparse one."""
    if not any(map(_grad_is_sparse, params)):  # the usual case, without a Python-level loop
        return
    for i, p in enumerate(params):
        if p.grad is not None and p.grad.is_sparse:
            raise ValueError(
                f"parameter {i} (shape {tuple(p.shape)}) has a sparse gradient: sharpness-aware "
                "optimizers need dense gradients (e.g. nn.Embedding(..., sparse=False))"
            )


def _as_groups(params: ParamsT) -> list[dict[str, Any]]:
    items = list(params)
    if items and isinstance(items[0], dict):
        return [dict(g, params=list(g["params"])) for g in items]
    return [{"params": items}]
