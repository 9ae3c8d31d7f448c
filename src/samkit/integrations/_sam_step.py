"""One SAM micro-batch inside a loop that a framework owns (Hugging Face Trainer, Accelerate).

Such a loop runs, per micro-batch, forward + backward; after the last micro-batch of a step it
clips the gradient, calls ``optimizer.step()`` and zeroes the gradients. SAM needs two passes per
micro-batch, so :func:`sam_micro_batch` replaces the backward of a micro-batch with both passes,
as ``samkit.train.SharpnessAwareStep`` does in its own loop:

1. the gradient summed by the earlier micro-batches of the step is set aside, so the first pass
   starts from zero gradients (each micro-batch gets its own perturbation);
2. first pass (forward + backward at ``w``; under DDP inside ``no_sync``: each replica perturbs
   with its own gradient), then ``first_step``: ``w -> w + e``;
3. the set-aside sum is put back; the second pass's backward at ``w + e`` adds onto it (the RNG
   state of the first forward is replayed first: the same dropout masks; BatchNorm layers use batch
   statistics without updating their running buffers), then ``unperturb`` restores ``w``.

The framework's own ``optimizer.step()`` then finds SAM waiting for its second step and makes the
base step with the summed SAM gradient (``SAM.step()`` after ``first_step()`` is
``second_step()``), after the framework's clipping, which therefore clips the SAM gradient.

A non-finite first pass in any micro-batch skips the whole step: the next micro-batch's
``first_step`` clears ``failed_pass``, so the failure is carried over with ``fail_step``. A
skipped step changes nothing: the BatchNorm running statistics as they were before the step's
first forward are put back by a step post-hook on the optimizer (one non-finite input would
otherwise leave NaN in ``running_var`` for every later evaluation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from samkit.optim import ESAM, SAM, unwrap

ESAM_UNSUPPORTED = (
    "{owner}: ESAM is not supported here (its data selection needs per-sample losses, its "
    "weight masks a first pass of their own); use SAM, or samkit.train.SharpnessAwareStep for ESAM"
)
OTHER_STEPS = (
    ("perturbs_before_first_pass", "a perturbation before the first pass"),
    ("ascent_policy", "an ascent_policy (steps without ascent)"),
)
ONE_FIRST_PASS = (
    "{owner}: {name} keeps state from each step's one first pass, so {setting} > 1 "
    "(gradient accumulation) is not supported with it; use SAM, or {setting} = 1"
)


def sam_optimizer(optimizer: Any, *, owner: str, setting: str, accumulation_steps: int) -> SAM:
    """The samkit optimizer inside ``optimizer`` (a framework's wrapper is looked through).

    Raises TypeError for a non-SAM optimizer and ValueError, naming the setting, for the
    combinations these integrations cannot make right (ESAM; GSAM, WSAM and Friendly-SAM with
    gradient accumulation)."""
    inner = unwrap(optimizer)
    if not isinstance(inner, SAM):
        raise TypeError(
            f"{owner} needs a samkit SAM-family optimizer (samkit.optim.SAM, GSAM, WSAM, "
            f"FriendlySAM), got {type(inner).__name__}"
        )
    if isinstance(inner, ESAM):
        raise ValueError(ESAM_UNSUPPORTED.format(owner=owner))
    # variants whose step is not "first pass, ascent, second pass" at every step
    for attribute, what in OTHER_STEPS:
        if getattr(inner, attribute, None):
            raise ValueError(
                f"{owner}: {type(inner).__name__} with {what} is not supported here; use one "
                "without it"
            )
    if inner.one_first_pass_per_step and accumulation_steps > 1:
        raise ValueError(
            ONE_FIRST_PASS.format(owner=owner, name=type(inner).__name__, setting=setting)
        )
    return inner


def sam_micro_batch(
    optimizer: SAM,
    model: nn.Module,
    run_pass: Callable[[], Tensor],
    *,
    no_sync: Callable[[], AbstractContextManager[Any]],
    scaler: Any = None,
) -> Tensor:
    """Both SAM passes of one micro-batch; returns what the first ``run_pass()`` returned.

    ``run_pass()`` runs forward and backward of the micro-batch exactly as the framework's
    loop would (loss scaling for accumulation and fp16 included) and returns the loss.
    ``no_sync()`` is the framework's context that keeps DDP from all-reducing a backward (the
    first pass and extra ascent passes run inside it, except for optimizers that combine the
    first-pass gradient with the second's, GSAM and WSAM, whose first pass must be the global
    one). ``scaler``: the ``GradScaler`` the framework scales its backward with, or None.
    Leaves ``optimizer`` at ``w`` with ``awaiting_second_step`` True; the framework's
    ``optimizer.step()`` (after the last micro-batch) makes the base step."""
    carried = optimizer.failed_pass if optimizer.awaiting_second_step else None
    if not optimizer.awaiting_second_step:  # the step's first micro-batch
        _BatchNormBackup.before_step(optimizer, model)
    params = optimizer.trained_parameters()  # the model's (behind flat=True's buffers, too)
    accumulated = [p.grad for p in params]  # the SAM-gradient sum of the step so far
    for p in params:
        p.grad = None
    rng = _rng_state(model)
    first_sync = contextlib.nullcontext if optimizer.stores_clean_gradient else no_sync
    with first_sync():
        loss = run_pass()
    ok = optimizer.first_step(scaler=scaler)
    for _ in range(optimizer.ascent_steps - 1):
        if not ok:
            break
        optimizer.zero_grad(set_to_none=True)
        with first_sync(), _replayed(model, rng):
            run_pass()
        ok = optimizer.ascent_step(scaler=scaler)
    failed = carried or optimizer.failed_pass
    for p, g in zip(params, accumulated):
        p.grad = g  # the second backward adds onto the sum
    try:
        with _replayed(model, rng):  # runs after a failed first pass too: DDP replicas all reduce
            run_pass()
    finally:  # an exception (e.g. out of memory) must not leave the model at w + e
        optimizer.unperturb()
    if failed is not None:
        optimizer.fail_step(failed)
    return loss


class _BatchNormBackup:
    """The running statistics of the model's BatchNorm layers before a step, put back by a step
    post-hook on the optimizer (one per optimizer) if that step was skipped (``skipped_steps``
    grew). The buffers are looked up at every step: a model moved or reloaded since has others."""

    def __init__(self) -> None:
        self.buffers: list[Tensor] = []
        self.saved: list[Tensor] = []
        self.skipped_before = 0

    @classmethod
    def before_step(cls, optimizer: SAM, model: nn.Module) -> None:
        backup = getattr(optimizer, "_samkit_bn_backup", None)
        if backup is None:
            backup = optimizer._samkit_bn_backup = cls()
            optimizer.register_step_post_hook(lambda opt, args, kwargs: backup.after_step(opt))
        backup.buffers = [
            b
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)
            if b is not None
        ]
        with torch.no_grad():
            backup.saved = [b.clone() for b in backup.buffers]
        backup.skipped_before = optimizer.skipped_steps

    @torch.no_grad()
    def after_step(self, optimizer: SAM) -> None:
        if self.saved and unwrap(optimizer).skipped_steps > self.skipped_before:
            for buffer, saved in zip(self.buffers, self.saved):
                buffer.copy_(saved)
        self.saved = []


@contextlib.contextmanager
def _replayed(model: nn.Module, rng: list[Tensor]) -> Iterator[None]:
    """The RNG state ``rng`` restored; BatchNorm layers normalise with batch statistics but leave
    their running buffers alone (they were updated by the first pass)."""
    _set_rng_state(model, rng)
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for bn in bns:
        bn.track_running_stats = False
    try:
        yield
    finally:
        for bn in bns:
            bn.track_running_stats = True


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _rng_state(model: nn.Module) -> list[Tensor]:
    """The CPU RNG state, and the model's accelerator's (dropout on a GPU draws from that one)."""
    device = _device(model)
    states = [torch.get_rng_state()]
    if device.type != "cpu":
        states.append(torch.get_device_module(device).get_rng_state(device))
    return states


def _set_rng_state(model: nn.Module, states: list[Tensor]) -> None:
    torch.set_rng_state(states[0])
    if len(states) > 1:
        device = _device(model)
        torch.get_device_module(device).set_rng_state(states[1], device)
