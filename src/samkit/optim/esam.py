"""ESAM: Efficient Sharpness-Aware Minimization (Du et al., ICLR 2022).

Two savings on top of SAM (``samkit.optim.sam``):

* SWP, stochastic weight perturbation: each parameter tensor joins the ascent with probability
  ``beta``; the others do not require grad during the first backward, so their weight gradients are
  never computed. ``e = rho * g_kept / ||g_kept|| / beta``, which keeps ``E[e]`` equal to SAM's
  (the paper's text says ``1 / (1 - beta)``; its authors' code, and the expectation, use
  ``1 / beta``).
* SDS, sharpness-sensitive data selection: from per-sample losses ``l0 = l(w)`` and
  ``l1 = l(w + e)``, keep the ``ceil(gamma * B)`` samples with the largest ``l1 - l0`` and run the
  second forward/backward on them only. ``sds_criterion="loss"`` ranks by ``l0`` instead (the paper
  shows the two correlate), which saves the extra no-grad forward at ``w + e``.

``beta = gamma = 1`` is SAM exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from samkit.optim import _conventions
from samkit.optim._base import ParamsT, on_owner
from samkit.optim.numerics import is_dtensor
from samkit.optim.sam import SAM

SDS_CRITERIA = ("sharpness", "loss")
#: Raised for sharded parameters: here for DTensors (FSDP2), by the step helper for FSDP1.
FSDP_UNSUPPORTED = (
    "ESAM with FSDP-sharded parameters is not supported: its weight masks toggle requires_grad "
    "on sharded parameters; use SAM, or DDP for ESAM"
)


class ESAM(SAM):
    """SAM with stochastic weight perturbation and sharpness-sensitive data selection.

    ``step(closure)`` takes a closure ``closure(index) -> per-sample losses``: with ``index=None``
    it computes the losses of the whole batch, otherwise of ``batch[index]`` only. It must NOT call
    ``backward`` (ESAM does), and it must return an unreduced loss of shape ``[B]``::

        def closure(index=None):
            x, y = (inputs, targets) if index is None else (inputs[index], targets[index])
            return F.cross_entropy(model(x), y, reduction="none")

        loss = optimizer.step(closure)

    ``step(closure)`` starts from zeroed gradients: any gradient the parameters hold is discarded
    (to accumulate micro-batches use ``samkit.train.SharpnessAwareStep(accumulation_steps=N)``).

    The SWP mask comes from a seeded ``torch.Generator`` (``seed``), so every data-parallel replica
    draws the same mask; its state is part of ``state_dict()``.
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        beta: float = 0.5,
        gamma: float = 0.5,
        sds_criterion: str = "sharpness",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta (SWP keep probability) must be in (0, 1], got {beta!r}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma (SDS selection ratio) must be in (0, 1], got {gamma!r}")
        if sds_criterion not in SDS_CRITERIA:
            raise ValueError(f"sds_criterion must be one of {SDS_CRITERIA}, got {sds_criterion!r}")
        if kwargs.get("ascent_steps", 1) != 1:
            raise ValueError("ESAM takes one ascent step; use SAM for ascent_steps > 1")
        if kwargs.get("flat"):
            raise ValueError(
                "flat=True is not supported with ESAM: its weight perturbation draws whole "
                "parameter tensors, which the flat buffers merge; use SAM(flat=True)"
            )
        super().__init__(params, base_optimizer, rho, **kwargs)
        if any(is_dtensor(p) for g in self.param_groups for p in g["params"]):
            raise ValueError(FSDP_UNSUPPORTED)
        self.beta, self.gamma, self.sds_criterion = beta, gamma, sds_criterion
        self.generator = torch.Generator().manual_seed(seed)
        self.last_kept_fraction = 1.0

    def _rho_factor(self) -> float:
        return 1.0 / self.beta

    @property
    def needs_perturbed_losses(self) -> bool:
        """True when SDS ranks by ``l1 - l0`` and so needs the losses at ``w + e``."""
        return self.sds_criterion == "sharpness" and self.gamma < 1.0

    @on_owner
    @contextmanager
    def swp(self) -> Iterator[list[Tensor]]:
        """Draw the SWP mask; inside the block, dropped tensors do not require grad.

        Run the first forward and backward inside it. Yields the kept tensors.
        """
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        keep = (torch.rand(len(params), generator=self.generator) < self.beta).tolist()
        dropped = [p for p, k in zip(params, keep) if not k]
        self.last_kept_fraction = 1.0 - len(dropped) / max(len(params), 1)
        for p in dropped:
            p.requires_grad_(False)
        try:
            yield [p for p, k in zip(params, keep) if k]
        finally:
            for p in dropped:
                p.requires_grad_(True)

    def sds_size(self, batch_size: int) -> int:
        """``ceil(gamma * B)``: how many samples the second pass keeps (rounding noise removed)."""
        return max(1, min(batch_size, math.ceil(round(self.gamma * batch_size, 6))))

    def sds_select(
        self, clean_losses: Tensor, perturbed_losses: Tensor | None = None
    ) -> Tensor | None:
        """Indices (sorted) of the ``ceil(gamma * B)`` most sharpness-sensitive samples.

        ``None`` means the whole batch (``gamma = 1``).
        """
        batch_size = clean_losses.numel()
        k = self.sds_size(batch_size)
        if k >= batch_size:
            return None
        if self.sds_criterion == "loss":
            score = clean_losses
        elif perturbed_losses is None:
            raise ValueError('sds_criterion="sharpness" needs the per-sample losses at w + e')
        else:
            score = perturbed_losses - clean_losses
        return torch.topk(score.detach().flatten(), k, sorted=False).indices.sort().values

    @on_owner
    def select_samples(
        self,
        clean_losses: Tensor,
        perturbed_losses: Callable[[], Tensor] | None = None,
    ) -> Tensor | None:
        """SDS after a successful ``first_step``: the indices (sorted) the second pass keeps.

        ``clean_losses`` are the per-sample losses at ``w`` (first pass). ``perturbed_losses()``
        computes the per-sample losses of the same batch at the current weights ``w + e``; it is
        called, under ``torch.no_grad()``, exactly when ``needs_perturbed_losses`` (and only
        then may it be None). ``None`` means the whole batch (see ``sds_select``).
        """
        perturbed = None
        if self.needs_perturbed_losses:
            if perturbed_losses is None:
                raise ValueError('sds_criterion="sharpness" needs the per-sample losses at w + e')
            with torch.no_grad():
                perturbed = perturbed_losses()
        return self.sds_select(clean_losses, perturbed)

    @on_owner
    def step(  # type: ignore[override]
        self, closure: Callable[[Tensor | None], Tensor] | None = None, *, scaler: Any = None
    ) -> Tensor | None:
        """One ESAM step; returns the mean first-pass loss over the whole batch.

        ``scaler``: a ``torch.amp.GradScaler`` (fp16) whose scale ESAM applies to its backward
        passes; call ``scaler.update()`` afterwards. Without a closure after ``first_step()``
        (GradScaler, Accelerate): ``second_step()``."""
        if self._awaiting_second_step:
            return self._finish_step(closure)
        if closure is None:
            raise RuntimeError(
                "ESAM.step() needs a closure(index=None) that returns the per-sample losses "
                "(reduction='none') of the batch, or of batch[index] when index is given, without "
                "calling backward; see the ESAM docstring for an example"
            )
        # No check for gradients accumulated before: by its contract the closure never calls
        # backward, so ESAM's step always starts from zeroed gradients (documented above).
        _conventions.refuse_framework_closure(self)
        scaled = scaler is not None and scaler.is_enabled()

        def backward(loss: Tensor) -> None:
            (scaler.scale(loss) if scaled else loss).backward()

        self.zero_grad(set_to_none=True)
        with torch.enable_grad(), self.swp():
            clean = _per_sample(closure(None))
            if clean.requires_grad:  # False only when SWP dropped every tensor
                backward(clean.mean())
        # an overflow leaves its non-finite gradients for scaler.step to find: one back-off
        ok = self.first_step(scaler=scaler, back_off=False)
        index = self.select_samples(clean, lambda: _per_sample(closure(None))) if ok else None
        if ok:
            self.zero_grad(set_to_none=True)
            with torch.enable_grad():
                backward(_per_sample(closure(index)).mean())
        if scaled:
            scaler.step(self)  # unscales, finds overflows, then calls step() -> second_step
        else:
            self.second_step()
        return clean.detach().mean()

    @on_owner
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["samkit"]["esam_generator"] = self.generator.get_state()
        return state

    @on_owner
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        generator_state = state_dict.get("samkit", {}).get("esam_generator")
        super().load_state_dict(state_dict)
        if generator_state is not None:
            self.generator.set_state(generator_state)


def _per_sample(losses: Tensor) -> Tensor:
    if not isinstance(losses, Tensor) or losses.ndim != 1:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            "the ESAM closure must return per-sample losses of shape [B] (use reduction='none'), "
            f"got {shape}"
        )
    return losses
