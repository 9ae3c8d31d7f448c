"""SAM in the Hugging Face ``Trainer``: replace ``Trainer`` with :class:`SAMTrainer`.

What it fixes. ``Trainer(optimizers=(SAM(...), None))`` fails: the Trainer runs one forward and
backward per micro-batch and then calls ``optimizer.step()`` without a closure, so SAM has no way
to run its second pass (``SAM.step() needs a closure``). Calling ``step(closure)`` from the
Trainer would not be right either: with ``gradient_accumulation_steps`` the gradients of the
earlier micro-batches would leak into the perturbation.

:class:`SAMTrainer` overrides ``training_step`` (and, given no optimizer, wraps the one the Trainer
builds in ``SAM``). Each micro-batch runs the Trainer's own
``training_step`` twice (so ``compute_loss`` overrides, label smoothing, ``num_items_in_batch``,
autocast and loss scaling apply to both passes): at ``w``, then at ``w + e`` with ``e = rho g /
||g||`` from that micro-batch alone, adding onto the SAM gradient of the earlier micro-batches
(see ``samkit.integrations._sam_step``). The Trainer then clips (``max_grad_norm``: the SAM
gradient), calls ``optimizer.step()`` (SAM's base step, on the SAM gradient), steps the LR
scheduler and saves checkpoints as usual; the optimizer's ``state_dict`` carries samkit's
``"samkit"`` entry, and a resumed run continues exactly as an uninterrupted one.

Refused at construction or at the start of ``train()``, each with a one-line ``ValueError``
naming the setting: DeepSpeed, FSDP, tensor/context/sequence parallelism (``parallelism_config``),
``torch.nn.DataParallel`` (``n_gpu > 1``), LOMO optimizers, ESAM, GSAM / WSAM / Friendly-SAM
with ``gradient_accumulation_steps > 1``, and variants with an ``ascent_policy`` or a perturbation
before the first pass.

fp16 on CPU: Accelerate 1.16 runs ``fp16=True`` on a CPU in full precision (no autocast, no
GradScaler), and so does ``SAMTrainer``; on a GPU the GradScaler's first-pass gradients are
unscaled before the perturbation and an overflow in either pass skips the step.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

try:
    from transformers import Trainer, TrainerCallback
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "samkit.integrations.transformers needs transformers: pip install 'samkit[integrations]'"
    ) from error

from samkit.integrations._sam_step import sam_micro_batch, sam_optimizer
from samkit.optim import SAM, SharpnessAwareOptimizer, unwrap

__all__ = ["SAMTrainer"]

DEFAULT_RHO = 0.05


class SAMTrainer(Trainer):
    """``transformers.Trainer`` that trains with SAM (see the module docstring).

    Either pass a samkit optimizer, ``optimizers=(SAM(model.parameters(), torch.optim.AdamW,
    rho=0.05, lr=...), None)``, or none: the optimizer the Trainer builds from its arguments
    (``optim``, ``learning_rate``, ``weight_decay``...) is then wrapped in ``SAM(rho=rho)``
    (``rho`` defaults to 0.05). Every other argument is the Trainer's.
    """

    def __init__(self, *args: Any, rho: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _refuse_settings(self)
        if self.optimizer is not None:
            if rho is not None:
                raise ValueError(
                    "SAMTrainer: rho is for the SAM that SAMTrainer builds; the optimizer passed "
                    "in optimizers=(...) has its own (drop rho=...)"
                )
            self._check_optimizer(self.optimizer)
        self.sam_rho = DEFAULT_RHO if rho is None else rho
        self.add_callback(_SkippedStepCallback())

    def create_optimizer(self, model: nn.Module | None = None) -> Any:
        """The Trainer's optimizer, wrapped in ``SAM(rho=rho)`` unless it is a samkit one."""
        optimizer = super().create_optimizer(model)
        if not isinstance(unwrap(optimizer), SharpnessAwareOptimizer):
            self.optimizer = optimizer = SAM(optimizer.param_groups, optimizer, rho=self.sam_rho)
        self._check_optimizer(optimizer)
        return optimizer

    def _check_optimizer(self, optimizer: Any) -> SAM:
        return sam_optimizer(
            optimizer,
            owner="SAMTrainer",
            setting="gradient_accumulation_steps",
            accumulation_steps=self.args.gradient_accumulation_steps,
        )

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Both SAM passes of one micro-batch; returns the first pass's loss (what is logged)."""
        optimizer = self._check_optimizer(self.optimizer)
        one_pass = super().training_step
        return sam_micro_batch(
            optimizer,
            model,
            lambda: one_pass(model, inputs, num_items_in_batch),
            no_sync=lambda: self.accelerator.no_sync(model),
            scaler=self.accelerator.scaler,
        )


def _refuse_settings(trainer: Trainer) -> None:
    """ValueError naming the first Trainer setting SAM cannot be right with."""
    args = trainer.args
    optim = str(getattr(args.optim, "value", args.optim))
    refused = [
        (trainer.is_deepspeed_enabled, "deepspeed", "DeepSpeed's engine runs the optimizer step"),
        (
            trainer.is_fsdp_enabled or bool(getattr(args, "fsdp", None)),
            "fsdp",
            "sharded parameters need SAM's shard_group and a first pass without no_sync",
        ),
        (
            getattr(args, "parallelism_config", None) is not None,
            "parallelism_config",
            "tensor / context / sequence parallel shards are not handled",
        ),
        (
            args.n_gpu > 1,
            "n_gpu > 1 (torch.nn.DataParallel)",
            "its replicas' dropout cannot be replayed; launch one process per GPU (torchrun)",
        ),
        (
            optim.lower() in ("lomo", "adalomo"),
            f"optim={optim}",
            "LOMO updates the weights during backward",
        ),
    ]
    for bad, setting, why in refused:
        if bad:
            raise ValueError(f"SAMTrainer does not support {setting}: {why}")


class _SkippedStepCallback(TrainerCallback):
    """When SAM skipped a step (a non-finite gradient, an fp16 overflow), tell the Trainer.

    Accelerate reports a skipped step only when ``optimizer.step`` was not called, but SAM's
    ``step`` always runs (it restores the weights); without this the Trainer would still advance
    the LR scheduler after a skipped step."""

    def __init__(self) -> None:
        self._before = 0

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._before = unwrap(kwargs["optimizer"]).skipped_steps

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs["optimizer"]
        if unwrap(optimizer).skipped_steps > self._before and hasattr(optimizer, "_is_overflow"):
            optimizer._is_overflow = True  # AcceleratedOptimizer.step_was_skipped
