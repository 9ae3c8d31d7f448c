"""SAM with Hugging Face Accelerate: ``accelerator.backward(loss)`` becomes :func:`sam_backward`.

What it fixes. After ``accelerator.prepare(model, SAM(...), loader)`` the optimizer is an
``AcceleratedOptimizer``, which hides ``first_step`` (AttributeError); ``optimizer.step(closure)``
inside ``accelerator.accumulate(model)`` is a no-op on the micro-batches that do not synchronise,
so their closures never run and those batches are silently dropped; and under fp16 Accelerate calls
``GradScaler.step(optimizer, closure)``, which SAM's closure path does not unscale.

:func:`sam_backward` runs both SAM passes of one micro-batch (``samkit.integrations._sam_step``):
the loop keeps Accelerate's own ``optimizer.step()`` / ``zero_grad()``, which Accelerate runs on
synchronising micro-batches only, and which then make the base step with the summed SAM gradient::

    model, optimizer, loader = accelerator.prepare(model, SAM(model.parameters(), ...), loader)

    def compute_loss(x, y):  # forward and loss, no backward: called once per pass
        return loss_fn(model(x), y)

    for x, y in loader:
        with accelerator.accumulate(model):  # optional
            loss = sam_backward(accelerator, model, optimizer, compute_loss, x, y)
            if accelerator.sync_gradients:  # optional: clips the SAM gradient
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()

Each micro-batch gets its own perturbation; the RNG state (dropout) of the first forward is
replayed for the second; bf16 autocast applies to both passes; with an fp16 GradScaler the
first-pass gradients are unscaled before the perturbation and an overflow in either pass skips the
step (``unwrap(optimizer).skipped_steps`` counts it; Accelerate's ``optimizer_step_was_skipped``
stays False, since SAM's ``step`` runs to restore the weights). Under DDP the first pass runs in
``accelerator.no_sync(model)``: each process perturbs with its own gradient (the paper's
m-sharpness); GSAM and WSAM, which combine the first-pass gradient with the second's, synchronise
it instead.

Refused with a one-line error naming the setting: DeepSpeed, FSDP, XLA and Megatron-LM
(``distributed_type``), ``parallelism_config``, ESAM, GSAM / WSAM / Friendly-SAM with
``gradient_accumulation_steps > 1``, variants with an ``ascent_policy`` or a perturbation before
the first pass, and a GradScaler (fp16) with a SAM that was not passed through
``accelerator.prepare``. fp16 on a CPU: Accelerate 1.16 runs it in full precision (no autocast,
no GradScaler), and so does this loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from accelerate import Accelerator
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "samkit.integrations.accelerate needs accelerate: pip install 'samkit[integrations]'"
    ) from error
from torch import Tensor, nn

from samkit.integrations._sam_step import sam_micro_batch, sam_optimizer
from samkit.optim import SAM, unwrap

__all__ = ["sam_backward"]

#: the distributed types whose gradient synchronisation is DDP's (``no_sync`` works)
SUPPORTED = ("NO", "MULTI_")


def sam_backward(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: Any,
    compute_loss: Callable[..., Tensor],
    *args: Any,
) -> Tensor:
    """Both SAM passes of one micro-batch, in place of ``accelerator.backward(loss)``.

    ``compute_loss(*args)`` runs the forward of the micro-batch and returns its loss, without
    backward; it is called at ``w`` and at ``w + e`` (a closure without ``args`` works too).
    ``model`` and ``optimizer`` are what ``accelerator.prepare`` returned. Returns the first
    pass's loss, detached. Call ``optimizer.step()`` afterwards, as usual: on the micro-batches
    where Accelerate synchronises it makes SAM's base step with the summed SAM gradient."""
    sam = check(accelerator, optimizer)

    def run_pass() -> Tensor:
        loss = compute_loss(*args)
        accelerator.backward(loss)
        return loss.detach()

    return sam_micro_batch(
        sam,
        model,
        run_pass,
        no_sync=lambda: accelerator.no_sync(model),
        scaler=accelerator.scaler,
    )


def check(accelerator: Accelerator, optimizer: Any) -> SAM:
    """The SAM inside ``optimizer``; ValueError / TypeError naming a setting it cannot serve."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if not kind.startswith(SUPPORTED):
        raise ValueError(
            f"sam_backward does not support distributed_type={kind}: only DDP-style data "
            "parallelism (or none) is handled; DeepSpeed and Megatron-LM step the optimizer "
            "themselves, FSDP and XLA shard or reduce the gradients in ways SAM's passes do not"
        )
    if getattr(accelerator, "parallelism_config", None) is not None:
        raise ValueError(
            "sam_backward does not support parallelism_config (tensor / context / sequence "
            "parallelism): SAM's norms and passes are not split across those shards"
        )
    sam = sam_optimizer(
        optimizer,
        owner="sam_backward",
        setting="gradient_accumulation_steps",
        accumulation_steps=accelerator.gradient_accumulation_steps,
    )
    prepared = getattr(accelerator, "_optimizers", [])
    if accelerator.scaler is not None and not any(unwrap(o) is sam for o in prepared):
        raise ValueError(
            "sam_backward with mixed_precision='fp16' needs the optimizer passed through "
            "accelerator.prepare: its step() unscales the SAM gradient with the GradScaler"
        )
    return sam
