"""When to ascend: SAM's second pass on some steps only (AE-SAM, RST / SS-SAM, late-phase SAM).

One mechanism, several policies. After a step's first backward, before its second pass, the
step asks the optimizer ``wants_ascent()`` (``SAM.step(closure)`` and
``samkit.train.SharpnessAwareStep`` do; see ``SharpnessAwareOptimizer.wants_ascent``). Without a
policy the answer is always yes (SAM). With one, a no makes the step a plain base step on the
first pass's gradient, ``skip_ascent()`` then ``second_step()``: one pass, through the same
guarded step as SAM's (non-finite skip, clipping, AMP), and the variants' combination hooks are
not applied (LookSAM's in-between update is its own hook, ``_combine_without_ascent``).

A policy decides once per step; ``steps`` (in ``state_dict``) counts the steps done, taken or
skipped, like the learning-rate schedule's clock, so the first step has ``t = 0``. Schedules over
training use ``t / total_steps`` (``total_steps``: the run's number of optimizer steps; settable
after construction, ``optimizer.ascent_policy.total_steps = n``, as ``samkit train`` does, and
required by the schedules that use it before their first decision). Every decision is the
same on every data-parallel replica (a different one would leave the replicas that ascend waiting
in the second pass's all-reduce): the clock and the seeded generator are replicated, and
AE-SAM's statistic is averaged over the replicas (one scalar all-reduce; see
:class:`GradientNormPolicy`).

Policies (each any SAM-family optimizer can take: ``opt.ascent_policy = RandomPolicy(0.5)``):

* :class:`EveryKPolicy`: steps ``t = 0, k, 2k, ...`` ascend (LookSAM's cycle).
* :class:`GradientNormPolicy` (AE-SAM, Jiang et al., ICLR 2023): ascend iff
  ``||g_t||^2 >= mu_t + c_t sigma_t``, with ``mu_t = delta mu_{t-1} + (1 - delta) ||g_t||^2`` and
  ``sigma_t^2 = delta sigma_{t-1}^2 + (1 - delta) (||g_t||^2 - mu_t)^2`` (``mu_0 = sigma_0 = 0``)
  and ``c_t = (t / T) lambda1 + (1 - t / T) lambda2``, linear from ``lambda2`` at the start to
  ``lambda1`` at the end (the defaults, -1 and 1, make SAM rare early and frequent late).
* :class:`RandomPolicy` (RST / SS-SAM, Zhao et al. 2022): ascend iff ``u_t < p_t``, ``u_t`` a
  uniform draw from a seeded ``torch.Generator``; ``p_t`` constant, or from ``p`` to ``p_end``
  along one of the paper's schedule families (piecewise, linear, trigonometric).
* :class:`LatePhasePolicy` (Zhou et al. 2024): plain steps until ``start_step`` (or the fraction
  ``start_fraction`` of ``total_steps``), SAM from then on.

:class:`AESAM`, :class:`RST` and :class:`LateSAM` are SAM with one of them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from samkit.optim._base import ParamsT
from samkit.optim.sam import SAM

__all__ = [
    "AESAM",
    "AscentPolicy",
    "EveryKPolicy",
    "GradientNormPolicy",
    "LatePhasePolicy",
    "LateSAM",
    "RST",
    "RST_SCHEDULES",
    "RandomPolicy",
]

RST_SCHEDULES = ("constant", "piecewise", "linear", "cosine")


class AscentPolicy:
    """Decides whether a step takes SAM's ascent (see the module docstring)."""

    #: False: the decision does not read the gradient (no norm, no collective).
    reads_gradient = False

    def __init__(self, total_steps: int | None = None) -> None:
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(f"total_steps must be an integer >= 1 or None, got {total_steps!r}")
        self.total_steps = total_steps
        self.steps = 0

    def decide(self, grad_sq: Callable[[], float]) -> bool:
        """This step's answer; ``grad_sq()`` is ``||g||^2`` of the first pass (same on every
        replica). Called once per step."""
        raise NotImplementedError

    def step_done(self, took: bool) -> None:
        """The end of a step (``took``: its base step ran)."""
        self.steps += 1

    def progress(self) -> float:
        """``t / total_steps`` in [0, 1]; ValueError without ``total_steps``."""
        if self.total_steps is None:
            raise ValueError(
                f"{type(self).__name__}: this schedule runs over the whole training and needs "
                "its length: pass total_steps= (the run's number of optimizer steps) or set "
                "optimizer.ascent_policy.total_steps before the first step"
            )
        return min(1.0, self.steps / self.total_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


class EveryKPolicy(AscentPolicy):
    """Ascend at steps ``0, k, 2k, ...`` (LookSAM)."""

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        super().__init__()
        self.k = k

    def decide(self, grad_sq: Callable[[], float]) -> bool:
        return self.steps % self.k == 0


class LatePhasePolicy(AscentPolicy):
    """Plain steps before ``start_step`` (or ``ceil(start_fraction * total_steps)``), then SAM."""

    def __init__(
        self,
        start_fraction: float | None = 0.875,
        *,
        start_step: int | None = None,
        total_steps: int | None = None,
    ) -> None:
        super().__init__(total_steps)
        if start_step is not None:
            if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
                raise ValueError(f"start_step must be an integer >= 0, got {start_step!r}")
            start_fraction = None
        elif start_fraction is None or not 0.0 <= start_fraction <= 1.0:
            raise ValueError(f"start_fraction must be in [0, 1], got {start_fraction!r}")
        self.start_fraction, self.start_step = start_fraction, start_step

    def start(self) -> int:
        """The first step that ascends."""
        if self.start_step is not None:
            return self.start_step
        self.progress()  # the error naming total_steps when it is missing
        return math.ceil(self.start_fraction * self.total_steps)  # type: ignore[operator]

    def decide(self, grad_sq: Callable[[], float]) -> bool:
        return self.steps >= self.start()


class RandomPolicy(AscentPolicy):
    """Ascend with probability ``p_t`` (RST / SS-SAM), from a seeded ``torch.Generator``.

    ``schedule``: ``"constant"`` (``p_t = p``) or, from ``p`` at ``t = 0`` to ``p_end`` at
    ``t = total_steps`` (``s = t / total_steps``): ``"piecewise"`` (``p`` for ``s < 1/2``, then
    ``p_end``), ``"linear"`` (``p + (p_end - p) s``), ``"cosine"``
    (``p_end + (p - p_end) (1 + cos(pi s)) / 2``). The families are the paper's; their
    parametrisation by the two end values is this library's. The generator draws one number per
    step whatever the schedule, and its state is in ``state_dict``.
    """

    def __init__(
        self,
        p: float = 0.5,
        *,
        p_end: float | None = None,
        schedule: str = "constant",
        seed: int = 0,
        total_steps: int | None = None,
    ) -> None:
        super().__init__(total_steps)
        for name, value in (("p", p), ("p_end", p if p_end is None else p_end)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        if schedule not in RST_SCHEDULES:
            raise ValueError(f"schedule must be one of {RST_SCHEDULES}, got {schedule!r}")
        if schedule != "constant" and p_end is None:
            raise ValueError(f"schedule {schedule!r} goes from p to p_end: give p_end")
        self.p, self.p_end, self.schedule = p, p if p_end is None else p_end, schedule
        self.generator = torch.Generator().manual_seed(seed)

    def probability(self) -> float:
        """``p_t`` of the coming step."""
        if self.schedule == "constant":
            return self.p
        s = self.progress()
        if self.schedule == "piecewise":
            return self.p if s < 0.5 else self.p_end
        if self.schedule == "linear":
            return self.p + (self.p_end - self.p) * s
        return self.p_end + (self.p - self.p_end) * (1.0 + math.cos(math.pi * s)) / 2.0

    def decide(self, grad_sq: Callable[[], float]) -> bool:
        p = self.probability()
        return torch.rand((), generator=self.generator, dtype=torch.float64).item() < p

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])


class GradientNormPolicy(AscentPolicy):
    """AE-SAM: ascend when ``||g||^2`` is high for its recent history (module docstring).

    ``mu`` and ``sigma^2`` move with steps that are taken only (a skipped step leaves them). A
    non-finite ``||g||^2`` answers no and moves nothing (the step is skipped anyway). Under DDP
    the statistic is the replicas' average of their own first-pass ``||g||^2`` (all-reduced by
    the step helper; with ``sync_perturbations`` each replica already has the global batch's
    gradient), so every replica keeps the same ``mu``, ``sigma`` and decision.
    """

    reads_gradient = True

    def __init__(
        self,
        delta: float = 0.9,
        lambda1: float = -1.0,
        lambda2: float = 1.0,
        *,
        total_steps: int | None = None,
    ) -> None:
        super().__init__(total_steps)
        if not 0.0 <= delta < 1.0:
            raise ValueError(f"delta must be in [0, 1), got {delta!r}")
        for name, value in (("lambda1", lambda1), ("lambda2", lambda2)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        self.delta, self.lambda1, self.lambda2 = delta, lambda1, lambda2
        self.mean, self.var = 0.0, 0.0
        self._pending: tuple[float, float] | None = None

    def threshold_factor(self) -> float:
        """``c_t`` of the coming step (no ``total_steps`` needed when constant)."""
        if self.lambda1 == self.lambda2:
            return self.lambda1
        s = self.progress()
        return s * self.lambda1 + (1.0 - s) * self.lambda2

    def decide(self, grad_sq: Callable[[], float]) -> bool:
        c = self.threshold_factor()
        x = grad_sq()
        self._pending = None
        if not math.isfinite(x):
            return False
        mean = self.delta * self.mean + (1.0 - self.delta) * x
        var = self.delta * self.var + (1.0 - self.delta) * (x - mean) ** 2
        self._pending = (mean, var)
        return x >= mean + c * math.sqrt(var)

    def step_done(self, took: bool) -> None:
        super().step_done(took)
        if took and self._pending is not None:
            self.mean, self.var = self._pending
        self._pending = None

    #: Recorded in the state dict: before 2026-12-02 samkit ran c_t from lambda1 to lambda2.
    C_DIRECTION = "lambda2 to lambda1"

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "mean": self.mean,
            "var": self.var,
            "c_direction": self.C_DIRECTION,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.mean, self.var = float(state["mean"]), float(state["var"])
        if self.lambda1 != self.lambda2 and state.get("c_direction") != self.C_DIRECTION:
            warnings.warn(
                "AE-SAM: this state was saved by a samkit that ran c_t from lambda1 to lambda2; "
                "it now runs from lambda2 to lambda1 (the paper's schedule), so the resumed run "
                f"switches direction at step {self.steps} (swap lambda1 and lambda2 to keep the "
                "old one)",
                RuntimeWarning,
                stacklevel=2,
            )


class AESAM(SAM):
    """AE-SAM: SAM on the steps whose ``||g||^2`` is high for its moving statistics, the base
    optimizer alone on the others (:class:`GradientNormPolicy`). With the defaults (``delta``
    0.9, ``lambda1`` -1, ``lambda2`` 1: our reading of the paper's settings, not checked against
    its text) c_t falls from 1 to -1, so SAM runs on few steps early and on most late.
    ``total_steps`` is needed when ``lambda1 != lambda2``."""

    one_first_pass_per_step = True  # a step decides from its one first pass

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        delta: float = 0.9,
        lambda1: float = -1.0,
        lambda2: float = 1.0,
        total_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        policy = GradientNormPolicy(delta, lambda1, lambda2, total_steps=total_steps)
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.ascent_policy = policy


class RST(SAM):
    """RST / SS-SAM: each step is SAM with probability ``p_t``, else the base optimizer alone
    (:class:`RandomPolicy`; expected cost ``1 + mean(p_t)`` passes per step). ``seed`` seeds the
    draws: give every data-parallel replica the same (``samkit train`` passes ``--run-seed``)."""

    one_first_pass_per_step = True  # a step decides from its one first pass

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        p: float = 0.5,
        p_end: float | None = None,
        schedule: str = "constant",
        seed: int = 0,
        total_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        policy = RandomPolicy(p, p_end=p_end, schedule=schedule, seed=seed, total_steps=total_steps)
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.ascent_policy = policy


class LateSAM(SAM):
    """Late-phase SAM: the base optimizer alone until ``start_step`` (or the fraction
    ``start_fraction`` of ``total_steps``; 0.875: SAM for the last 25 of 200 epochs, the paper's
    WRN-16-8 / CIFAR-10 setting), then SAM (:class:`LatePhasePolicy`)."""

    one_first_pass_per_step = True  # a step decides from its one first pass

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        start_fraction: float = 0.875,
        start_step: int | None = None,
        total_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        policy = LatePhasePolicy(start_fraction, start_step=start_step, total_steps=total_steps)
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.ascent_policy = policy
