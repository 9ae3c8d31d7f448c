"""SAM in PyTorch Lightning in one line: ``Trainer(callbacks=[SAMCallback()])``.

With automatic optimisation and ``configure_optimizers`` returning a samkit optimizer, Lightning
calls ``optimizer.step(closure)`` and SAM runs the closure (``training_step`` + backward) at
``w`` and at ``w + e``. That much is right without help; what Lightning does around the closure
is not, and the optimizer cannot see it:

* BatchNorm running statistics are updated by both passes (the second time with the statistics
  of the perturbed model); samkit's reference, ``samkit.train.SharpnessAwareStep``, updates them
  in the first pass only.
* Dropout draws new masks in the second pass: the SAM gradient is not taken on the loss whose
  gradient made ``e``.
* Clipping runs after every closure, so it clips the first-pass gradient too (by value, that
  turns ``e``); with ``bf16-mixed`` Lightning refuses it, taking SAM for a fused optimizer.
* ``accumulate_grad_batches = N > 1``: the backward of the first N - 1 micro-batches runs
  outside ``optimizer.step``, with no perturbation (``SAM.step`` refuses these gradients).
* ``precision='16-mixed'``: one backward, then ``GradScaler.step(optimizer)``: no second pass
  (``SAM.step`` refuses that too).

:class:`SAMCallback` makes the first four right, from the hooks that fire between the passes:

* ``on_before_optimizer_step`` (after each closure call, before SAM's ``first_step`` /
  ``second_step``): after the first pass it puts the RNG state back to the first forward's and
  stops the BatchNorm layers in training mode from updating their buffers; after the last pass
  it lets them update again and clips the gradient itself, with the Trainer's
  ``gradient_clip_val`` / ``gradient_clip_algorithm``, which it takes over (sets to None) for the
  fit (Lightning's own clipping functions, so the same formulas).
* ``on_after_backward``, with accumulation: after each micro-batch's one backward at ``w``
  (Lightning's closure), it runs that micro-batch's other passes itself (``first_step``,
  ``training_step`` again through the strategy, ``unperturb``): each micro-batch has its own
  perturbation and the step uses the sum of their SAM gradients, as
  ``SharpnessAwareStep(accumulation_steps=N)``. The last micro-batch's closure runs inside
  ``SAM.step`` after that ``first_step``, so SAM takes it as the step's last pass.
* A step skipped for a non-finite gradient leaves the BatchNorm buffers as they were.

It refuses (``MisconfigurationException`` when ``fit`` starts; one line naming the setting and
the fix): fp16 with a GradScaler, ESAM (its closure protocol differs), a
``configure_gradient_clipping`` override, clipping with a variant that combines both passes'
gradients (GSAM, WSAM, LookSAM), accumulation with a variant that keeps state from the step's
one first pass (GSAM, WSAM, Friendly-SAM, LookSAM, Momentum-SAM) or an ascent policy, and an
optimizer that is not samkit's.

Manual optimisation: the callback checks the optimizers and makes Lightning's wrapper
(``self.optimizers()``) run samkit's methods on the real optimizer; :class:`PassReplay` gives a
later pass the first one's RNG state and frozen BatchNorm (recipe in docs/integrations.md).
:func:`missing_callback_check` is a callback factory for Lightning's
``lightning.pytorch.callbacks_factory`` entry point: it warns when a samkit optimizer trains
without ``SAMCallback`` where that is silently wrong.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loops.optimization.automatic import ClosureResult
from lightning.pytorch.trainer import call as _call
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.optim import Optimizer

from samkit.optim import ESAM, SharpnessAwareOptimizer, unwrap

__all__ = ["PassReplay", "SAMCallback", "is_first_pass", "missing_callback_check"]

DOCS = "docs/integrations.md"
NOT_SAMKIT = (
    "SAMCallback: configure_optimizers returned {names}, not a samkit optimizer; return e.g. "
    "samkit.optim.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1), or drop SAMCallback"
)
ACCUMULATION = (
    "SAMCallback: Trainer(accumulate_grad_batches={n}) with a strategy that accumulates itself "
    "(DeepSpeed) cannot give each micro-batch its own SAM perturbation; use "
    "accumulate_grad_batches=1 with a {n}x larger batch"
)
ONE_FIRST_PASS = (
    "SAMCallback: Trainer(accumulate_grad_batches={n}) with {name} is not supported ({name} keeps "
    "state from each step's one first pass, or an ascent policy decides per step); use "
    "accumulate_grad_batches=1, or samkit.optim.SAM without an ascent policy"
)
FP16 = (
    "SAMCallback: precision='16-mixed' (a GradScaler) with automatic optimisation cannot run SAM "
    "(Lightning runs one backward, then GradScaler.step(optimizer): no second pass); use "
    f"precision='bf16-mixed' or '32-true', or manual optimisation with "
    f"opt.first_step(scaler=self.trainer.precision_plugin.scaler) (see {DOCS})"
)
ESAM_AUTOMATIC = (
    "SAMCallback: ESAM with automatic optimisation is not supported (ESAM.step(closure) needs "
    "per-sample losses from closure(index) and chooses the second pass's samples; Lightning's "
    f"closure returns the mean loss); use samkit.optim.SAM, or manual optimisation (see {DOCS})"
)
CLIPPING_OVERRIDE = (
    "SAMCallback: {module}.configure_gradient_clipping is overridden; Lightning calls it after "
    "each of SAM's passes, so it would clip the first-pass gradient too; remove it and use "
    "Trainer(gradient_clip_val=..., gradient_clip_algorithm=...), which SAMCallback applies to "
    "the SAM gradient only"
)
CLIPPING_COMBINED = (
    "SAMCallback: Trainer(gradient_clip_val={val}) with {name} is not supported ({name} combines "
    "the first-pass gradient with the second's inside second_step, after the clipping Lightning "
    "allows); remove gradient_clip_val, or use samkit.optim.SAM"
)
PASSES = (
    "SAMCallback: {name}.step ran a number of passes ({n}) this callback did not expect; "
    "it cannot tell which pass is the last (for clipping and BatchNorm): please report it"
)
MISSING_CALLBACK = (
    "{names} trains with automatic optimisation without samkit's SAMCallback: {problems}. Add "
    "samkit.integrations.lightning.SAMCallback() to Trainer(callbacks=[...]) (see {docs})"
)


class PassReplay:
    """A later pass of the same SAM step: the RNG state of the first forward, BatchNorm frozen.

    Create it just before the first forward; ``with replay:`` around each later forward (and its
    backward) first puts the RNG state back (the same dropout masks; CPU generator and, for a
    model on an accelerator, its generator), and makes every BatchNorm layer in training mode
    normalise with batch statistics without updating its running buffers (the first pass did).
    Reusable: ``with replay:`` again replays the same state (extra ascent passes, ESAM's
    selection forward)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.device = _device(module)
        self.rng = _rng_state(self.device)
        self._frozen: list[nn.modules.batchnorm._BatchNorm] = []

    def rewind(self) -> None:
        """Put the RNG state back to the one at creation."""
        _set_rng_state(self.device, self.rng)

    def freeze_batchnorm(self) -> None:
        """BatchNorm layers in training mode stop updating their running buffers (idempotent)."""
        for bn in _batchnorms(self.module):
            if bn.training:
                bn.track_running_stats = False  # batch statistics, buffers untouched
                self._frozen.append(bn)

    def release_batchnorm(self) -> None:
        """Undo :meth:`freeze_batchnorm`."""
        frozen, self._frozen = self._frozen, []
        for bn in frozen:
            bn.track_running_stats = True

    def __enter__(self) -> PassReplay:
        self.rewind()
        self.freeze_batchnorm()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release_batchnorm()


class SAMCallback(Callback):
    """Makes Lightning's automatic optimisation run a samkit optimizer as samkit's own loop does.

    Add it to the Trainer (``Trainer(callbacks=[SAMCallback()])``) and return a samkit optimizer
    from ``configure_optimizers``. See the module docstring for what it fixes and what it
    refuses (``MisconfigurationException``, at the start of ``fit``, before any step)."""

    def __init__(self) -> None:
        self._optimizers: list[SharpnessAwareOptimizer] = []
        self._automatic = False
        self._taken_clip: tuple[Any, Any] | None = None  # the Trainer's, while we apply them
        self._clip: tuple[float, bool] | None = None  # (value, by value)
        # one step (or micro-batch)
        self._replay: PassReplay | None = None
        self._passes = 0  # closure calls of SAM.step finished in this micro-batch
        self._rng_after_first: list[Tensor] | None = None
        self._skipped_before: list[int] = []
        self._bn_backup: list[tuple[Tensor, Tensor]] = []
        # gradient accumulation (accumulate_grad_batches > 1)
        self._params: list[Tensor] = []
        self._sum: list[Tensor | None] | None = None  # the step's SAM-gradient sum, set aside
        # (batch, index) of a micro-batch whose SAM passes on_after_backward runs
        self._micro_batch: tuple[Any, int] | None = None
        self._steps = True  # this micro-batch ends with an optimizer step
        self._carried: str | None = None  # a failed pass in an earlier micro-batch of the step
        self._in_extra_pass = False
        self._finished = False  # the last pass of this step was seen

    @property
    def in_first_pass(self) -> bool:
        """True while ``training_step`` runs a step's (or micro-batch's) first pass, at ``w``."""
        return not self._automatic or (self._passes == 0 and not self._in_extra_pass)

    # -- fit start and end -----------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._optimizers = _samkit_optimizers(trainer)
        if not self._optimizers:
            names = ", ".join(type(o).__name__ for o in trainer.optimizers) or "no optimizer"
            raise MisconfigurationException(NOT_SAMKIT.format(names=names))
        self._automatic = pl_module.automatic_optimization
        if not self._automatic:
            return
        opt = self._optimizers[0]
        _check_automatic(trainer, opt)
        val = trainer.gradient_clip_val
        if is_overridden("configure_gradient_clipping", pl_module):
            raise MisconfigurationException(
                CLIPPING_OVERRIDE.format(module=type(pl_module).__name__)
            )
        if val and opt.stores_clean_gradient:
            raise MisconfigurationException(
                CLIPPING_COMBINED.format(val=val, name=type(opt).__name__)
            )
        self._params = opt.trained_parameters()  # the model's (behind flat=True's buffers, too)
        # Lightning would clip after both passes: take its settings over for this fit
        self._taken_clip = (val, trainer.gradient_clip_algorithm)
        by_value = trainer.gradient_clip_algorithm == GradClipAlgorithmType.VALUE  # else by norm
        self._clip = (float(val), by_value) if val else None
        trainer.gradient_clip_val = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._give_back(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        for opt in self._optimizers:  # an exception in a later pass must not leave w + e
            opt.unperturb()
        self._give_back(trainer)

    def _give_back(self, trainer: pl.Trainer) -> None:
        """The Trainer's clipping settings back; BatchNorm layers released."""
        if self._taken_clip is not None:
            trainer.gradient_clip_val, trainer.gradient_clip_algorithm = self._taken_clip
            self._taken_clip = None
        if self._replay is not None:
            self._replay.release_batchnorm()
            self._replay = None

    # -- one step ----------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        n = trainer.accumulate_grad_batches if self._automatic else 1
        first = batch_idx % n == 0  # the first micro-batch of a step (Lightning zeroes grads)
        if first:
            self._skipped_before = [o.skipped_steps for o in self._optimizers]
            self._bn_backup = _backup_batchnorm(pl_module)
            self._carried = None
        if not self._automatic:
            return
        self._replay = PassReplay(pl_module)
        self._passes, self._finished = 0, False
        self._rng_after_first = None
        self._micro_batch, self._steps = None, True
        if n == 1:
            return
        opt = self._optimizers[0]
        _check_accumulation(trainer, opt)
        self._steps = not trainer.fit_loop._should_accumulate()
        # each micro-batch's first pass starts from zero gradients: its own perturbation
        self._sum = None if first else [p.grad for p in self._params]
        for p in self._params:
            p.grad = None
        if first and self._steps:  # a step of one micro-batch (an epoch's end): SAM.step's
            return
        self._micro_batch = (batch, batch_idx)  # its passes run in on_after_backward
        if self._steps and not opt.awaiting_second_step:  # no earlier micro-batch had a loss
            opt.first_step()  # (no gradient, no perturbation): SAM.step finishes the step

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With accumulation, after a micro-batch's one backward at ``w``: its other passes.

        Lightning runs one closure per micro-batch (outside ``optimizer.step`` but for the last
        one, and then after the ``first_step`` of the micro-batch before, so SAM.step takes the
        closure as its last pass): this runs the micro-batch's other SAM passes
        (``training_step`` again, through the strategy, with the RNG state replayed and
        BatchNorm frozen) and adds its SAM gradient to the step's sum."""
        if self._micro_batch is None or self._in_extra_pass or self._replay is None:
            return
        opt, (batch, batch_idx) = self._optimizers[0], self._micro_batch
        self._in_extra_pass = True
        try:
            ok = opt.first_step()  # w -> w + e from this micro-batch's gradient
            for _ in range(getattr(opt, "ascent_steps", 1) - 1):
                if not ok:
                    break
                opt.zero_grad(set_to_none=True)
                self._extra_pass(trainer, batch, batch_idx)
                ok = opt.ascent_step()
            self._carried = self._carried or opt.failed_pass
            self._put_sum_back()  # the second backward adds onto the step's sum
            if ok:
                self._extra_pass(trainer, batch, batch_idx)
        finally:  # an exception (e.g. out of memory) must not leave the model at w + e
            self._in_extra_pass = False
            opt.unperturb()

    def _extra_pass(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        assert self._replay is not None
        with self._replay:
            out = _call._call_strategy_hook(trainer, "training_step", batch, batch_idx)
            loss = ClosureResult.from_training_step_output(out, trainer.accumulate_grad_batches)
            if loss.closure_loss is not None:
                trainer.strategy.backward(loss.closure_loss, trainer.optimizers[0])

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Called after each closure call of SAM's ``step(closure)``."""
        opt = unwrap(optimizer)
        if not self._automatic or self._replay is None:
            return
        if not isinstance(opt, SharpnessAwareOptimizer):
            return
        self._passes += 1
        if self._finished:
            raise RuntimeError(PASSES.format(name=type(opt).__name__, n=self._passes))
        if self._micro_batch is None and _more_passes(opt, self._passes):
            if self._passes == 1:
                self._rng_after_first = _rng_state(self._replay.device)
            self._replay.__enter__()  # the next forward: same RNG draws, BatchNorm frozen
            return
        self._finished = True  # the last pass: the base step follows
        self._replay.release_batchnorm()
        if self._carried is not None:  # a micro-batch failed: the step is skipped
            opt.fail_step(self._carried)
        if self._clip is not None:
            val, by_value = self._clip
            plugin = trainer.precision_plugin  # Lightning's clipping (without its fused check)
            if by_value:
                plugin.clip_grad_by_value(optimizer, val)
            else:
                plugin.clip_grad_by_norm(optimizer, val)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._replay is not None:  # still frozen if the last pass did not run (non-finite)
            self._replay.release_batchnorm()
            self._replay = None
        if self._rng_after_first is not None:  # as after the first forward (the others replay)
            _set_rng_state(_device(pl_module), self._rng_after_first)
            self._rng_after_first = None
        self._micro_batch = None
        if not self._steps:  # more micro-batches follow
            return
        self._sum = None
        skipped = [o.skipped_steps for o in self._optimizers] != self._skipped_before
        if skipped:  # a skipped step changes nothing, BatchNorm buffers included
            _restore_batchnorm(self._bn_backup)
        elif self._automatic and not self._finished:  # a taken step whose last pass we missed
            name = type(self._optimizers[0]).__name__
            raise RuntimeError(PASSES.format(name=name, n=self._passes))
        self._bn_backup = []

    def _put_sum_back(self) -> None:
        """The gradient sum of the step's earlier micro-batches back in place (None if none)."""
        if self._sum is None:
            for p in self._params:
                p.grad = None
        else:
            for p, g in zip(self._params, self._sum):
                p.grad = g


def is_first_pass(pl_module: pl.LightningModule) -> bool:
    """In ``training_step``: whether this is the first pass of the step (or micro-batch).

    With :class:`SAMCallback` and automatic optimisation ``training_step`` runs once per SAM
    pass; log (``self.log``) or record the loss when this is True, or each step is counted
    twice, once at ``w + e``. True without the callback and with manual optimisation."""
    trainer = pl_module._trainer
    callbacks = trainer.callbacks if trainer is not None else []
    return all(c.in_first_pass for c in callbacks if isinstance(c, SAMCallback))


def missing_callback_check() -> list[Callback]:
    """Callback factory for the ``lightning.pytorch.callbacks_factory`` entry point.

    Its callback, at the start of a fit, when a samkit optimizer trains with automatic
    optimisation and no :class:`SAMCallback`, warns about the settings that are then silently
    wrong (BatchNorm, dropout, clipping)."""
    return [_MissingCallbackCheck()]


class _MissingCallbackCheck(Callback):
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = _samkit_optimizers(trainer)
        if not optimizers:
            return
        if not pl_module.automatic_optimization or any(
            isinstance(c, SAMCallback) for c in trainer.callbacks
        ):
            return
        problems = []
        if any(bn.training for bn in _batchnorms(pl_module)):
            problems.append("BatchNorm running statistics are updated in both passes")
        if any(
            isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in pl_module.modules()
        ):
            problems.append("dropout draws other masks in the second pass")
        if trainer.gradient_clip_val or is_overridden("configure_gradient_clipping", pl_module):
            problems.append("gradient clipping also clips the first-pass gradient")
        if problems:
            names = ", ".join(sorted({type(o).__name__ for o in optimizers}))
            warnings.warn(
                MISSING_CALLBACK.format(names=names, problems="; ".join(problems), docs=DOCS),
                UserWarning,
                stacklevel=2,
            )


# -- helpers ---------------------------------------------------------------------------------


def _samkit_optimizers(trainer: pl.Trainer) -> list[SharpnessAwareOptimizer]:
    found = (unwrap(o) for o in trainer.optimizers)
    return [o for o in found if isinstance(o, SharpnessAwareOptimizer)]


def _check_automatic(trainer: pl.Trainer, opt: SharpnessAwareOptimizer) -> None:
    """What automatic optimisation cannot run right, refused before any step."""
    if trainer.accumulate_grad_batches != 1:
        _check_accumulation(trainer, opt)
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise MisconfigurationException(FP16)
    if isinstance(opt, ESAM):
        raise MisconfigurationException(ESAM_AUTOMATIC)


def _check_accumulation(trainer: pl.Trainer, opt: SharpnessAwareOptimizer) -> None:
    n = trainer.accumulate_grad_batches
    if trainer.strategy.handles_gradient_accumulation or not hasattr(
        trainer.fit_loop, "_should_accumulate"
    ):
        raise MisconfigurationException(ACCUMULATION.format(n=n))
    if opt.one_first_pass_per_step or getattr(opt, "ascent_policy", None) is not None:
        raise MisconfigurationException(ONE_FIRST_PASS.format(n=n, name=type(opt).__name__))


def _more_passes(opt: SharpnessAwareOptimizer, passes: int) -> bool:
    """Whether ``opt.step(closure)`` calls the closure again after its ``passes``-th call."""
    if getattr(opt, "perturbs_before_first_pass", False):  # Momentum-SAM: one pass, at w~
        return False
    wants_ascent = getattr(opt, "wants_ascent", None)  # an ascent policy may say no
    if passes == 1 and wants_ascent is not None and not wants_ascent():
        return False  # (asked before SAM.step asks; the answer holds for the step)
    return passes <= getattr(opt, "ascent_steps", 1)


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def _backup_batchnorm(module: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(buffer, copy) for the running statistics of every BatchNorm layer in training mode."""
    return [
        (b, b.clone())
        for bn in _batchnorms(module)
        if bn.training
        for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
        if b is not None
    ]


@torch.no_grad()
def _restore_batchnorm(backup: list[tuple[Tensor, Tensor]]) -> None:
    for buffer, copy in backup:
        buffer.copy_(copy)


def _device(module: nn.Module) -> torch.device:
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(module.parameters()).device


def _rng_state(device: torch.device) -> list[Tensor]:
    """The CPU RNG state, and the accelerator's (dropout on a GPU draws from that one)."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_rng_state(device: torch.device, states: list[Tensor]) -> None:
    torch.set_rng_state(states[0])
    if len(states) > 1:
        torch.cuda.set_rng_state(states[1], device)
