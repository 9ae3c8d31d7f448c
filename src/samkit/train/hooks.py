"""Callbacks into the training loop, for tests and for embedding ``samkit.train.train``.

The loop calls each hook, when set, at a fixed point: a test can slow a run down to kill it
mid-epoch, make one torchrun rank fail at a given step, or signal a run while it evaluates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TrainHooks"]


@dataclass(frozen=True)
class TrainHooks:
    #: Called with the (1-based) number of the step about to run, before its batch is used.
    before_step: Callable[[int], None] | None = None
    #: Called with the number of the step just taken (after its statistics are counted).
    after_step: Callable[[int], None] | None = None
    #: Called before every evaluation (not counted in the evaluation time).
    before_eval: Callable[[], None] | None = None
