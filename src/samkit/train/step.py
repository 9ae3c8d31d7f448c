"""One sharpness-aware training step with the details every hand-written SAM loop gets wrong.

``SharpnessAwareStep(model, optimizer, loss_fn)(inputs, targets)`` runs, for SAM and ESAM:

* BatchNorm running statistics updated by the first pass only (the official behaviour;
  ``bn_stats="second"`` or ``"both"`` change it): the other passes, and always the extra ascent
  passes and ESAM's selection forward, normalise with batch statistics but leave the buffers alone.
* The same random draws (dropout, stochastic depth, shake-shake) in every pass: the RNG state
  before the first forward is replayed before each later forward.
* AMP: ``amp="bf16"`` autocasts; ``amp="fp16"`` also scales the loss with ``torch.amp.GradScaler``.
  First-pass gradients are unscaled before the perturbation norm (computed in float32); the scaler's
  single ``unscale_`` per update is used on the SAM gradient; an overflow in either pass skips the
  step and backs the scale off.
* m-sharpness (``m``): the batch is split into chunks of ``m`` samples; each chunk gets its own
  perturbation and second-pass gradient, and the base step uses their average (SAM paper Sec. 4.1).
* Gradient accumulation (``accumulation_steps``) and clipping (``max_grad_norm``) act on the SAM
  gradient, i.e. on the second-pass gradients; perturbations stay per micro-batch.
* DDP: the whole first pass (forward included) runs under ``model.no_sync()``; only the last
  second-pass backward of an optimizer step all-reduces. A skip decided on one replica is taken by
  all. So each replica perturbs with its own local gradient (m-sharpness with m = per-replica
  batch, the SAM paper's setting); ``sync_perturbations=True`` instead all-reduces the first-pass
  gradients too, so every replica uses the perturbation of the global batch.
* FSDP (``fully_shard`` / DTensor parameters, or ``FullyShardedDataParallel``): a rank holds only a
  shard of each weight, so there is no per-replica perturbation; the first-pass gradient is
  reduce-scattered and its norm summed over the shards, which gives exactly the global-batch
  perturbation (``sync_perturbations`` is True; passing False is an error).
* An optimizer's ``ascent_policy`` (AE-SAM, RST, late-phase SAM, LookSAM) is asked after the
  first pass (``wants_ascent``); a no makes the step a base step on that pass's gradient (one
  pass). Momentum-SAM (``perturbs_before_first_pass``) is perturbed before its only pass.
* SyncBatchNorm: its forward (in training mode) and backward are collectives, so every replica
  must run the same passes. The BatchNorm policy above applies to it unchanged (batch statistics
  of the global batch, running buffers from the first pass only), and whether a first pass or an
  ascent step failed is agreed across replicas before the extra forwards (ascent steps, ESAM's
  selection forward), so a non-finite gradient on one replica cannot leave the others waiting.

Any other optimizer gets one plain pass with the same AMP, accumulation and clipping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from samkit.optim import ESAM, SAM, numerics, unwrap
from samkit.optim.esam import FSDP_UNSUPPORTED as ESAM_FSDP_UNSUPPORTED
from samkit.optim.sam_on import unperturbed_frozen
from samkit.train.distributed import fsdp_shard_group

BN_STATS = ("first", "second", "both")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepOutput:
    """What one call did. ``took_step`` is None while gradients are still being accumulated."""

    loss: Tensor  # mean first-pass loss of the micro-batch, detached
    outputs: Tensor  # first-pass model outputs, detached (for the train error rate)
    took_step: bool | None
    grad_norm: Tensor | None  # global norm of the (SAM) gradient before clipping


class SharpnessAwareStep:
    """Callable training step: ``step(inputs, targets) -> StepOutput``.

    ``loss_fn(outputs, targets)`` returns per-sample losses (``reduction="none"``; required for
    ESAM's data selection) or their mean."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        m: int | None = None,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        amp: str = "none",
        bn_stats: str = "first",
        replay_rng: bool = True,
        sync_perturbations: bool | None = None,
    ) -> None:
        # a framework's wrapper (Accelerate, Lightning) hides first_step / second_step
        inner = unwrap(optimizer)
        if isinstance(inner, SAM):
            optimizer = inner
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"m (m-sharpness chunk size) must be a positive integer, got {m!r}")
        if m is not None and not isinstance(optimizer, SAM):
            raise ValueError("m (m-sharpness) needs a sharpness-aware optimizer (SAM, ESAM)")
        if (
            isinstance(accumulation_steps, bool)
            or not isinstance(accumulation_steps, int)
            or accumulation_steps < 1
        ):
            raise ValueError(
                f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}"
            )
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        own = {id(p) for p in model.parameters()}
        trained = (  # SAM(flat=True)'s param groups hold flat buffers: the model's are behind
            optimizer.trained_parameters()
            if isinstance(optimizer, SAM)
            else [p for g in optimizer.param_groups for p in g["params"]]
        )
        if not any(id(p) in own for p in trained):
            raise ValueError(
                "the optimizer holds none of the model's parameters (built for another model?): "
                "the step would train nothing"
            )
        fsdp = fsdp_shard_group(model, optimizer)
        if fsdp is not None:
            if sync_perturbations is False:
                raise ValueError(
                    "sync_perturbations=False is impossible with FSDP: each rank holds only a "
                    "shard of the weights, so the perturbation is the global batch's; leave it "
                    "None (or True)"
                )
            if isinstance(optimizer, ESAM):
                raise ValueError(ESAM_FSDP_UNSUPPORTED)
            sync_perturbations = True
        if sync_perturbations and isinstance(optimizer, ESAM):
            raise ValueError(
                "sync_perturbations is not supported with ESAM: its weight masks leave parameters "
                "without first-pass gradients, which a synchronised DDP backward cannot reduce"
            )
        may_skip = getattr(optimizer, "ascent_policy", None) is not None  # asked once per step
        if (getattr(optimizer, "one_first_pass_per_step", False) or may_skip) and (
            m is not None or accumulation_steps > 1
        ):
            raise ValueError(
                f"{type(optimizer).__name__} keeps state from each step's first pass, so a step "
                "takes one first pass: m-sharpness (m) and accumulation_steps > 1 are not "
                "supported with it"
            )
        if (
            getattr(optimizer, "stores_clean_gradient", False)
            and not sync_perturbations
            and dist.is_available()
            and dist.is_initialized()
            and hasattr(model, "no_sync")
        ):
            raise ValueError(
                f"{type(optimizer).__name__} under DDP needs sync_perturbations=True: it combines "
                "the first-pass gradient with the (all-reduced) second-pass one, and a replica's "
                "own first-pass gradient would make the replicas' updates differ"
            )
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)}, got {amp!r}")
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
        if may_skip and bn_stats == "second":
            raise ValueError(
                f"{type(optimizer).__name__} skips the second pass on some steps: bn_stats must "
                "be 'first' or 'both'"
            )
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.m, self.accumulation_steps, self.max_grad_norm = m, accumulation_steps, max_grad_norm
        self.bn_stats, self.replay_rng = bn_stats, replay_rng
        self.sync_perturbations = bool(sync_perturbations)
        self._fsdp = fsdp is not None
        self._params = trained  # the model's (behind SAM(flat=True)'s buffers, too)
        # where the plain path's gradient norm is summed (FSDP shards), fixed for these params
        shard_group = fsdp if fsdp not in (None, ()) else None
        self._norm_keys = numerics.reduce_keys(self._params, shard_group)
        self.device = next(model.parameters()).device
        self.amp_dtype = AMP_DTYPES[amp]
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        self.skipped_plain_steps = 0
        self._micro = 0
        self._failed_pass: str | None = None  # a failure in any micro-batch fails the whole step
        # With SyncBatchNorm every training forward is a collective (see _agree_ok)
        self._sync_bn = any(isinstance(mod, nn.SyncBatchNorm) for mod in model.modules())
        # A skipped step changes nothing: the BatchNorm buffers as they were before its first
        # forward are put back (one non-finite input would otherwise poison running_var).
        self._bn_buffers: list[Tensor] = []
        self._bn_backup: list[Tensor] = []

    @property
    def skipped_steps(self) -> int:
        if isinstance(self.optimizer, SAM):
            return self.optimizer.skipped_steps
        return self.skipped_plain_steps

    def __call__(self, inputs: Tensor, targets: Tensor) -> StepOutput:
        batch = inputs.shape[0] if inputs.ndim else 0
        if batch == 0 or targets.ndim == 0 or targets.shape[0] != batch:
            raise ValueError(
                "a training step needs a non-empty batch with one target per input, got inputs of "
                f"shape {tuple(inputs.shape)} and targets of shape {tuple(targets.shape)}"
            )
        if self._micro % self.accumulation_steps == 0:
            self._save_bn_buffers()
        is_sam = isinstance(self.optimizer, SAM)
        size = self.m if (is_sam and self.m) else batch
        starts = range(0, batch, size)
        last_micro = (self._micro + 1) % self.accumulation_steps == 0
        outputs, losses = [], []
        for i, start in enumerate(starts):
            x, y = inputs[start : start + size], targets[start : start + size]
            weight = x.shape[0] / batch / self.accumulation_steps
            sync = last_micro and i == len(starts) - 1
            chunk = self._sam_chunk if is_sam else self._plain_chunk
            if is_sam and self.optimizer.perturbs_before_first_pass:
                chunk = self._pre_perturbed_chunk
            out, loss = chunk(x, y, weight, sync)
            outputs.append(out)
            losses.append(loss * x.shape[0] / batch)
        self._micro += 1
        output = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        loss = torch.stack(losses).sum()
        if not last_micro:
            return StepOutput(loss, output, None, None)
        took_step, grad_norm = self._apply_sam() if is_sam else self._apply_plain()
        if not took_step:
            self._restore_bn_buffers()
        return StepOutput(loss, output, took_step, grad_norm)

    # -- the passes ---------------------------------------------------------------------------

    def _sam_chunk(self, x: Tensor, y: Tensor, weight: float, sync: bool) -> tuple[Tensor, Tensor]:
        opt = self.optimizer
        esam = isinstance(opt, ESAM)
        accumulated = self._take_grads()  # the SAM-gradient sum so far, kept out of the first pass
        rng = self._rng_state()
        first = self._pass("first", None, sync=self.sync_perturbations)
        with opt.swp() if esam else contextlib.nullcontext(), first:
            out = self.model(x)
            per_sample = self.loss_fn(out, y)
            if esam and per_sample.ndim != 1 and opt.gamma < 1.0:
                raise ValueError(
                    "ESAM's data selection needs per-sample losses: make loss_fn return shape [B] "
                    f"(reduction='none'), got shape {tuple(per_sample.shape)}"
                )
            loss = per_sample.mean()
            if loss.requires_grad:  # False only when ESAM's SWP dropped every tensor
                self._backward(loss)
        average = self._replica_average()
        if not opt.wants_ascent(scaler=self.grad_scaler, average=average):
            # the first pass's gradient is the update's (unscaled in _apply_sam; one first pass
            # per step, so no accumulated sum); under DDP that pass ran under no_sync
            if average is not None:
                for p in (p for p in self._params if p.grad is not None):
                    p.grad.copy_(average(p.grad))
            opt.skip_ascent()
            return out.detach(), loss.detach()
        self._unscale_first_pass()
        ok = self._agree_ok(opt.first_step())
        for _ in range(opt.ascent_steps - 1):
            if not ok:
                break
            opt.zero_grad(set_to_none=True)
            with self._pass("ascent", rng):
                self._backward(_mean(self.loss_fn(self.model(x), y)))
            self._unscale_first_pass()
            ok = self._agree_ok(opt.ascent_step())
        self._failed_pass = self._failed_pass or opt.failed_pass
        index = None
        if esam and ok:  # after a failed first pass the step is skipped: no selection needed

            def perturbed_losses() -> Tensor:  # ESAM calls it (no grad) only when it ranks by them
                with self._pass("ascent", rng):
                    return self.loss_fn(self.model(x), y)

            index = opt.select_samples(per_sample.detach(), perturbed_losses)
        self._put_grads(accumulated)
        if index is not None:
            x, y = x[index], y[index]
        # Run even after a non-finite first pass: DDP replicas must all reach the all-reduce.
        try:
            with self._pass("second", rng, sync=sync):
                self._backward(_mean(self.loss_fn(self.model(x), y)) * weight)
        finally:  # an exception here (e.g. out of memory) must not leave the model at w + e
            opt.unperturb()
        return out.detach(), loss.detach()

    def _pre_perturbed_chunk(
        self, x: Tensor, y: Tensor, weight: float, sync: bool
    ) -> tuple[Tensor, Tensor]:
        """Momentum-SAM: one plain pass at w~; second_step (or a failure here) restores w."""
        self.optimizer.pre_perturb()
        try:
            return self._plain_chunk(x, y, weight, sync)
        except BaseException:
            self.optimizer.unperturb()
            raise

    def _plain_chunk(
        self, x: Tensor, y: Tensor, weight: float, sync: bool
    ) -> tuple[Tensor, Tensor]:
        with self._pass("plain", None, sync=sync):
            out = self.model(x)
            loss = _mean(self.loss_fn(out, y))
            self._backward(loss * weight)
        return out.detach(), loss.detach()

    @contextlib.contextmanager
    def _pass(self, kind: str, rng: list[Tensor] | None, sync: bool = False) -> Iterator[None]:
        """DDP no_sync unless ``sync``, RNG replay, BatchNorm statistics policy, autocast."""
        if rng is not None and self.replay_rng:
            self._set_rng_state(rng)
        freeze_bn = kind == "ascent" or f"{kind}/{self.bn_stats}" in (
            "second/first",
            "first/second",
        )
        # FSDP1 has a no_sync too, but it would leave unsharded gradients behind: never use it.
        no_sync = None if self._fsdp else getattr(self.model, "no_sync", None)
        bns = _batchnorms(self.model) if freeze_bn else []
        for bn in bns:  # batch statistics, running buffers untouched (see _BatchNorm.forward)
            bn.track_running_stats = False
        try:
            autocast = torch.autocast(
                self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
            )
            frozen = (  # SAM-ON's first backward: no weight gradients it would not use
                unperturbed_frozen(self.optimizer, local=not sync)
                if kind == "first" and not isinstance(self.optimizer, ESAM)
                else contextlib.nullcontext()
            )
            with (
                no_sync() if (no_sync and not sync) else contextlib.nullcontext(),
                autocast,
                frozen,
            ):
                yield
        finally:
            for bn in bns:
                bn.track_running_stats = True

    def _backward(self, loss: Tensor) -> None:
        # autocast covers the forward only; backward ops run in the forward's dtypes anyway
        with torch.autocast(self.device.type, enabled=False):
            (self.grad_scaler.scale(loss) if self.grad_scaler else loss).backward()

    # -- applying the step --------------------------------------------------------------------

    def _apply_sam(self) -> tuple[bool, Tensor | None]:
        opt, scaler = self.optimizer, self.grad_scaler
        if self._failed_pass is not None:
            opt.fail_step(self._failed_pass)
            self._failed_pass = None
        self._agree_on_skip()
        first_pass_failed = opt.failed_pass is not None
        if scaler is not None:
            if first_pass_failed:
                # The scaler never saw that overflow. The step is skipped anyway, so let its one
                # unscale_ of this update find an inf: it then backs off and resets its growth
                # counter exactly as for an overflow in the second pass.
                grads = [p.grad for p in self._params if p.grad is not None]
                if grads:
                    grads[0].fill_(float("inf"))
            opt.sync_gradients()  # flat=True: unscale_ reads the buffers
            scaler.unscale_(opt.base_optimizer)  # the one unscale_ of this update: the SAM gradient
        took = opt.second_step(zero_grad=True, max_grad_norm=self.max_grad_norm)
        if scaler is not None:
            scaler.update()
        return took, opt.last_grad_norm

    def _apply_plain(self) -> tuple[bool, Tensor | None]:
        opt, scaler = self.optimizer, self.grad_scaler
        if scaler is not None:
            scaler.unscale_(opt)
        params = [p for p in self._params if p.grad is not None]
        grads = [numerics.local(p.grad) for p in params]
        key_of, devices = self._norm_keys
        keys = [key_of[p] for p in params]
        grad_norm, norm_value = numerics.norm_value(
            lambda dtype: numerics.global_norm(grads, keys, devices, foreach=True, dtype=dtype)
        )
        took = numerics.guarded_step(
            opt.step,
            grads,
            norm_value,
            max_grad_norm=self.max_grad_norm,
            agree=self._agree_finite if self._distributed() else None,
            owner=type(opt).__name__,
            skipped_before=self.skipped_plain_steps,
            stacklevel=3,
        )
        if not took:
            self.skipped_plain_steps += 1
        if scaler is not None:
            scaler.update()
        opt.zero_grad(set_to_none=True)
        return took, grad_norm

    def _agree_finite(self, finite: bool) -> bool:
        """Under DDP: True only if the gradient is finite on every replica."""
        flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def _agree_on_skip(self) -> None:
        """Under DDP a first pass that failed on any replica fails on all (weights stay equal)."""
        opt = self.optimizer
        if not self._distributed():
            return
        flag = torch.tensor([0.0 if opt.failed_pass is None else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0.0:
            opt.fail_step("first (on another replica)")

    def _agree_ok(self, ok: bool) -> bool:
        """With SyncBatchNorm under torch.distributed: True only if ``ok`` on every replica.

        Each extra forward (ascent step, ESAM's selection forward) runs SyncBatchNorm's
        collectives, so whether it runs must not depend on one replica's gradients. A replica that
        was fine but sees a failure elsewhere skips those forwards too; its second pass still runs
        (as on every replica) and the step is then skipped by all (``_agree_on_skip``).
        """
        if not (self._sync_bn and dist.is_available() and dist.is_initialized()):
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag.item() == 1.0

    def _replica_average(self) -> Callable[[Tensor], Tensor] | None:
        """Under DDP with per-replica first passes, the mean over the replicas (all decide an
        ascent alike from it, and a step without one averages its gradient); else None."""
        group = getattr(self.model, "process_group", None)
        if not self._distributed() or self.sync_perturbations:
            return None

        def average(t: Tensor) -> Tensor:
            dist.all_reduce(t, group=group)
            return t / dist.get_world_size(group)

        return average

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and hasattr(self.model, "no_sync")

    # -- BatchNorm buffers, gradients and RNG ---------------------------------------------------

    @torch.no_grad()
    def _save_bn_buffers(self) -> None:
        # looked up each step: the model may have been moved or converted since __init__
        self._bn_buffers = buffers = _batchnorm_buffers(self.model)
        if len(self._bn_backup) != len(buffers) or any(
            b.shape != c.shape for b, c in zip(buffers, self._bn_backup)
        ):
            self._bn_backup = [torch.empty_like(b) for b in buffers]
        for backup, buffer in zip(self._bn_backup, buffers):
            backup.copy_(buffer)

    @torch.no_grad()
    def _restore_bn_buffers(self) -> None:
        for backup, buffer in zip(self._bn_backup, self._bn_buffers):
            buffer.copy_(backup)

    def _take_grads(self) -> list[Tensor | None]:
        grads = [p.grad for p in self._params]
        for p in self._params:
            p.grad = None
        return grads

    def _put_grads(self, grads: list[Tensor | None]) -> None:
        for p, g in zip(self._params, grads):
            p.grad = g  # the second backward accumulates into the running sum

    def _unscale_first_pass(self) -> None:
        if self.grad_scaler is None:
            return
        grads = [numerics.local(p.grad) for p in self._params if p.grad is not None]
        numerics.scale_(grads, 1.0 / self.grad_scaler.get_scale(), foreach=True)

    def _rng_state(self) -> list[Tensor]:
        if not self.replay_rng:
            return []
        states = [torch.get_rng_state()]
        if self.device.type != "cpu":
            states.append(torch.get_device_module(self.device).get_rng_state(self.device))
        return states

    def _set_rng_state(self, states: list[Tensor]) -> None:
        torch.set_rng_state(states[0])
        if len(states) > 1:
            torch.get_device_module(self.device).set_rng_state(states[1], self.device)

    def state_dict(self) -> dict[str, Any]:
        """The step's own state; save it with the optimizer's.

        The micro-batch counter and the GradScaler; between the micro-batches of an accumulation
        also the gradient sum so far, the BatchNorm buffers as they were before the step (put back
        if it is skipped) and whether a pass already failed, so that a resume there continues
        exactly. Under torch.distributed that sum is this rank's own: every rank saves its own."""
        state: dict[str, Any] = {"micro": self._micro}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        if self._micro % self.accumulation_steps:
            state["accumulated"] = {
                "grads": [
                    None if p.grad is None else p.grad.detach().clone() for p in self._params
                ],
                "bn_backup": [b.clone() for b in self._bn_backup],
                "failed_pass": self._failed_pass,
            }
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._micro = int(state.get("micro", 0))
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        accumulated = state.get("accumulated")
        if self._micro % self.accumulation_steps == 0:
            return
        if accumulated is None or len(accumulated["grads"]) != len(self._params):
            raise ValueError(
                f"this step state is {self._micro % self.accumulation_steps} micro-batch(es) into "
                "an accumulation but does not hold their gradient sum (saved by an older samkit, "
                "or for other parameters): resume from a state saved at an optimizer step"
            )
        for p, g in zip(self._params, accumulated["grads"]):
            p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype).clone()
        self._bn_buffers = _batchnorm_buffers(self.model)
        self._bn_backup = [
            b.to(device=c.device, dtype=c.dtype).clone()
            for b, c in zip(accumulated["bn_backup"], self._bn_buffers)
        ]
        self._failed_pass = accumulated["failed_pass"]


def _mean(losses: Tensor) -> Tensor:
    return losses.mean() if losses.ndim else losses


def _batchnorm_buffers(model: nn.Module) -> list[Tensor]:
    """The running statistics (mean, var, count) of every BatchNorm layer that tracks them."""
    return [
        buffer
        for bn in _batchnorms(model)
        for buffer in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
        if buffer is not None
    ]


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
