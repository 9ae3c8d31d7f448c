"""SAF and MESA (Du et al., Sharpness-Aware Training for Free, NeurIPS 2022): the base optimizer
on the training loss plus a *trajectory loss*, with no ascent and no extra backward.

Per sample i of a batch (``loss_i`` the training loss, ``f_w(x_i)`` the model's logits)::

    L_i = loss_i + lambda * tau^2 * KL( softmax(z_i / tau) || softmax(f_w(x_i) / tau) )

with the teacher logits ``z_i`` (no gradient flows into them):

* **SAF**: the logits the model itself gave sample i during the epoch ``E`` epochs before this
  one (``epochs_back``), kept per sample in a bank. Needs each sample's index in the training set
  (``make_loader(..., indices=True)`` yields ``(x, y, index)``). Cost: SGD's (one pass).
* **MESA**: the logits of an exponential moving average of the weights (and BatchNorm statistics,
  :class:`samkit.train.ema.EMA`) for the same x_i, in eval mode: one extra no-grad forward per
  step (~1.3x SGD), no bank.

Both add the term only from epoch ``start_epoch + 1`` on (counting from 1, as the progress bar
does): the first ``start_epoch`` epochs train on the plain loss, bit for bit as the base optimizer
alone. ``samkit train --optimizer saf|mesa`` builds them (:func:`create_trajectory_loss`); in a
loop of your own::

    saf = SAF(len(train_set), num_classes)          # or MESA(model)
    step = SharpnessAwareStep(model, base_optimizer, saf.wrap(per_sample_loss))
    for x, y, index in loader:                       # make_loader(..., indices=True)
        saf.prepare(x, index, epoch)                 # before the step: the teacher's logits
        out = step(x, y)
        saf.after_step(model, out.outputs, bool(out.took_step))  # SAF: store; MESA: EMA

Why a module of the training system and not an optimizer: these methods change the loss, not the
step. Their registry entries (``saf``, ``mesa``) have no optimizer class (the base optimizer
steps alone) and their options configure this loss; the teacher needs what only a training loop
has (sample indices, the epoch, the EMA of :mod:`samkit.train.ema`), and ``samkit.optim``
imports nothing of the training system.

The rules, from the paper and the authors' code (github.com/AngusDujw/SAF: SAF_train.py,
MESA_train.py, run.sh, README), and where we chose:

* The KL term: the authors' ``F.kl_div(F.softmax(out / T).log(), F.softmax(z / T), reduction=
  "none").sum(-1).mean() * T**2``, i.e. the batch mean of the per-sample term above. Computed here
  per sample (added to the per-sample losses the step helper averages) with ``log_softmax``, in
  float32 at least (bf16 autocast outputs are upcast).
* Defaults: ``lambda`` 0.3 for SAF and 0.8 for MESA (README "--reinforce (0.3/0.8)", and run.sh's
  ImageNet commands; SAF_train.py's argparse default, 0.16, is not the one they ran); ``tau`` 5
  (README: "a very stable parameter, no need to tune"); ``E`` 3 (README "(2/3)", SAF_train.py's
  default; run.sh's ImageNet command uses 2); MESA's EMA decay 0.9998 per step (their scripts'
  ``--model-ema-decay`` default, which run.sh keeps), the EMA updated after every step from the
  first (not only from the start epoch), its forward in eval mode (timm's ModelEmaV2).
* The start: README "E_start (5): from which epoch to apply the trajectory loss". Their loop adds
  it when its 0-based epoch counter exceeds E_start, i.e. after E_start + 1 plain epochs; we read
  ``start_epoch`` as the number of plain epochs (default 5, the paper's value), so
  ``start_epoch=6`` reproduces their code exactly. Recommended: 5, or ~30% of the epochs.
* SAF's bank: the authors store every sample's logits every epoch from the first, in E + 1 slots
  (slot ``epoch % (E + 1)``), and read slot ``(epoch - E) % (E + 1)``. We keep E slots (slot
  ``epoch % E``): each sample is seen once per epoch and its old logits are read (in the loss)
  before the new ones are written (after the step), so one slot fewer suffices. Each slot also
  records the epoch it was written in, and a sample without logits from exactly epoch ``e - E``
  (``e < E``; dropped with the ragged last batch then; its step skipped) gets no trajectory term;
  the authors' code would use whatever its slot holds (zeros, i.e. a uniform teacher, at first).
  The bank is float32 in host memory (as their numpy array): N x C x E x 4 bytes, 7.2 MB for
  Fashion-MNIST, 60 MB for CIFAR-100, 15 GB for ImageNet (theirs is larger), and it is part of
  every checkpoint so that a resumed run continues bit for bit.
* Only steps taken (finite loss and gradients) write the bank and update MESA's EMA, as samkit's
  ``--ema-decay``. The train loss in the metrics stays the plain cross-entropy.
* Under torch.distributed every rank's bank gets every rank's samples of each step (gathered),
  and MESA's teacher buffers (BatchNorm statistics, each replica's from its own batches) are
  averaged over the ranks after each update: the teacher, the bank and so rank 0's checkpoint are
  the same on every rank.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from samkit.train.ema import EMA

__all__ = [
    "MESA",
    "METHODS",
    "SAF",
    "TrajectoryLoss",
    "create_trajectory_loss",
    "needs_indices",
    "trajectory_kl",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def trajectory_kl(student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """``tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))`` per sample (shape [B]),
    classes on dim 1; float32 at least, the gradient flows into ``student`` only."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    log_p_student = F.log_softmax(student.to(dtype) / tau, dim=1)
    log_p_teacher = F.log_softmax(teacher.detach().to(dtype) / tau, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True)
    return kl.sum(dim=1) * tau**2


def _check_common(lmbda: float, tau: float, start_epoch: int) -> None:
    if not (isinstance(lmbda, (int, float)) and 0.0 <= lmbda < float("inf")):
        raise ValueError(f"lmbda (the trajectory loss's weight) must be >= 0, got {lmbda!r}")
    if not (isinstance(tau, (int, float)) and 0.0 < tau < float("inf")):
        raise ValueError(f"tau (the temperature) must be > 0, got {tau!r}")
    if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
        raise ValueError(f"start_epoch must be an integer >= 0, got {start_epoch!r}")


class TrajectoryLoss:
    """What SAF and MESA share: the term, its weight and temperature, when it starts, and the
    per-step protocol ``prepare`` (before the step) / the wrapped loss / ``after_step``."""

    #: Whether :meth:`prepare` needs the samples' indices in the training set.
    needs_indices = False
    name = "trajectory"

    def __init__(self, lmbda: float, tau: float, start_epoch: int):
        _check_common(lmbda, tau, start_epoch)
        self.lmbda, self.tau, self.start_epoch = float(lmbda), float(tau), start_epoch
        self._teacher: Tensor | None = None  # this step's teacher logits (None: no term)
        self._mask: Tensor | None = None  # which samples have a teacher (None: all)

    def active(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) adds the term."""
        return epoch >= self.start_epoch

    def prepare(self, inputs: Tensor, index: Tensor | None, epoch: int) -> None:
        """Before the step on ``inputs``: find its teacher logits (none before the start)."""
        self._teacher = self._mask = None
        if self.active(epoch):
            self._teacher, self._mask = self._teacher_logits(inputs, index, epoch)

    def _teacher_logits(
        self, inputs: Tensor, index: Tensor | None, epoch: int
    ) -> tuple[Tensor | None, Tensor | None]:
        raise NotImplementedError

    def term(self, outputs: Tensor) -> Tensor | None:
        """``lambda * tau^2 * KL`` per sample for this step's outputs (0 for samples without a
        teacher); None when no sample has one (the loss is then the plain loss, bit for bit)."""
        if self._teacher is None:
            return None
        if self._teacher.shape != outputs.shape:
            raise ValueError(
                f"{self.name}: the teacher's logits have shape {tuple(self._teacher.shape)}, the "
                f"model's outputs {tuple(outputs.shape)} (prepare() was given another batch?)"
            )
        kl = trajectory_kl(outputs, self._teacher, self.tau) * self.lmbda
        return kl if self._mask is None else torch.where(self._mask, kl, torch.zeros_like(kl))

    def wrap(self, loss_fn: LossFn) -> LossFn:
        """``loss_fn`` plus the term (per sample if ``loss_fn`` returns per-sample losses)."""

        def loss_with_trajectory(outputs: Tensor, targets: Tensor) -> Tensor:
            losses = loss_fn(outputs, targets)
            term = self.term(outputs)
            if term is None:
                return losses
            return losses + (term if losses.ndim else term.mean())

        return loss_with_trajectory

    def after_step(self, model: nn.Module, outputs: Tensor, took_step: bool) -> None:
        """After the step (``outputs``: its detached outputs); forgets this step's teacher."""
        self._teacher = self._mask = None

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _check_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("method") != self.name:
            got = state.get("method") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a {self.name} state (method {got!r})")


class SAF(TrajectoryLoss):
    """SAF: the teacher of sample i in epoch e is the model's own logits for it in epoch
    ``e - epochs_back`` (see the module docstring for the bank and the rules). ``dtype``: the
    bank's (float32, as the authors')."""

    needs_indices = True
    name = "saf"

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        *,
        lmbda: float = 0.3,
        tau: float = 5.0,
        start_epoch: int = 5,
        epochs_back: int = 3,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(lmbda, tau, start_epoch)
        for what, value in (("num_samples", num_samples), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        if isinstance(epochs_back, bool) or not isinstance(epochs_back, int) or epochs_back < 1:
            raise ValueError(f"epochs_back (E) must be an integer >= 1, got {epochs_back!r}")
        self.epochs_back = epochs_back
        self.logits = torch.zeros(epochs_back, num_samples, num_classes, dtype=dtype)
        self.written = torch.full((epochs_back, num_samples), -1, dtype=torch.int64)  # epoch
        self._index: Tensor | None = None
        self._epoch = 0

    def prepare(self, inputs: Tensor, index: Tensor | None, epoch: int) -> None:
        if index is None:
            raise ValueError(
                "SAF needs each sample's index in the training set: a loader made with "
                "make_loader(..., indices=True) yields (x, y, index)"
            )
        index = torch.as_tensor(index).reshape(-1).to("cpu", torch.int64)
        if index.numel() != inputs.shape[0]:
            raise ValueError(f"{index.numel()} indices for a batch of {inputs.shape[0]} samples")
        if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < self.logits.shape[1]:
            raise ValueError(
                f"sample indices must lie in [0, {self.logits.shape[1]}) (the training set SAF "
                f"was built for), got [{int(index.min())}, {int(index.max())}]"
            )
        self._index, self._epoch = index, epoch
        super().prepare(inputs, index, epoch)

    def _teacher_logits(
        self, inputs: Tensor, index: Tensor | None, epoch: int
    ) -> tuple[Tensor | None, Tensor | None]:
        assert index is not None
        slot = epoch % self.epochs_back
        mask = self.written[slot, index] == epoch - self.epochs_back
        if not bool(mask.any()):
            return None, None
        teacher = self.logits[slot, index]
        if bool(mask.all()):
            return teacher.to(inputs.device), None
        teacher[~mask] = 0.0  # finite stand-ins, masked out of the term
        return teacher.to(inputs.device), mask.to(inputs.device)

    @torch.no_grad()
    def after_step(self, model: nn.Module, outputs: Tensor, took_step: bool) -> None:
        super().after_step(model, outputs, took_step)
        index, self._index = self._index, None
        if not took_step or index is None:
            return
        if outputs.shape != (index.numel(), self.logits.shape[2]):
            raise ValueError(
                f"SAF stores [batch, {self.logits.shape[2]}] logits, got outputs of shape "
                f"{tuple(outputs.shape)}"
            )
        index, logits = _from_every_rank(index, outputs.detach().to("cpu", self.logits.dtype))
        slot = self._epoch % self.epochs_back
        self.logits[slot, index] = logits
        self.written[slot, index] = self._epoch

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "logits": self.logits, "written": self.written}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        logits, written = state["logits"], state["written"]
        if logits.shape != self.logits.shape or written.shape != self.written.shape:
            raise ValueError(
                f"SAF bank of shape {tuple(logits.shape)}, this run's is "
                f"{tuple(self.logits.shape)} (E x samples x classes)"
            )
        self.logits.copy_(logits)
        self.written.copy_(written)


class MESA(TrajectoryLoss):
    """MESA: the teacher is an exponential moving average of the model (weights and buffers,
    ``shadow = decay * shadow + (1 - decay) * w`` after every step taken), run in eval mode under
    ``amp_dtype`` autocast (the training step's)."""

    name = "mesa"

    def __init__(
        self,
        model: nn.Module,
        *,
        lmbda: float = 0.8,
        tau: float = 5.0,
        start_epoch: int = 5,
        decay: float = 0.9998,
        amp_dtype: torch.dtype | None = None,
    ):
        super().__init__(lmbda, tau, start_epoch)
        if not (isinstance(decay, (int, float)) and 0.0 < decay < 1.0):
            raise ValueError(f"decay (MESA's EMA) must be in (0, 1), got {decay!r}")
        self.decay, self.amp_dtype = float(decay), amp_dtype
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.ema = EMA(model, self.decay, into=self.teacher)

    @torch.no_grad()
    def _teacher_logits(
        self, inputs: Tensor, index: Tensor | None, epoch: int
    ) -> tuple[Tensor | None, Tensor | None]:
        device = inputs.device.type
        enabled = self.amp_dtype is not None
        with torch.autocast(device, dtype=self.amp_dtype, enabled=enabled):
            return self.teacher(inputs), None

    def after_step(self, model: nn.Module, outputs: Tensor, took_step: bool) -> None:
        super().after_step(model, outputs, took_step)
        if took_step:
            self.ema.update(model)
            _average_buffers_over_ranks(self.teacher)

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        ema = state["ema"]
        if set(ema) != set(self.ema.shadow):
            raise ValueError("MESA's EMA state is for another model (its keys differ)")
        self.ema.load_state_dict(ema)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _from_every_rank(index: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Under torch.distributed, every rank's samples of this step (indices and logits, on the
    CPU), so that each rank's SAF bank holds the whole training set; else the arguments."""
    if not _distributed():
        return index, logits
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (index, logits))
    return torch.cat([i for i, _ in gathered]), torch.cat([z for _, z in gathered])


@torch.no_grad()
def _average_buffers_over_ranks(module: nn.Module) -> None:
    """Under torch.distributed, the mean over the ranks of ``module``'s floating-point buffers
    (MESA's teacher: each replica's BatchNorm statistics come from its own batches; averaged, the
    teacher is the same on every rank, and so is the checkpoint rank 0 writes)."""
    if not _distributed():
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(dist.get_world_size())


#: ``samkit train --optimizer NAME`` -> its trajectory loss (the registry's entries saf, mesa).
METHODS: dict[str, type[TrajectoryLoss]] = {"saf": SAF, "mesa": MESA}


def needs_indices(method: str) -> bool:
    """Whether ``method``'s training loader must yield each sample's index."""
    return method in METHODS and METHODS[method].needs_indices


def create_trajectory_loss(
    method: str,
    model: nn.Module,
    num_samples: int,
    num_classes: int,
    *,
    amp_dtype: torch.dtype | None = None,
    **options: Any,
) -> TrajectoryLoss | None:
    """The trajectory loss of registry method ``method`` with its ``options`` (the registry's
    option names), or None for a method without one."""
    if method == "saf":
        return SAF(num_samples, num_classes, **options)
    if method == "mesa":
        return MESA(model, amp_dtype=amp_dtype, **options)
    return None
