"""SIGINT / SIGTERM as a request to stop at the next step boundary, agreed across torchrun ranks."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["StopSignals"]


class StopSignals:
    """Turns SIGINT / SIGTERM into a request to stop (a second SIGINT raises
    ``KeyboardInterrupt`` at once). The handlers are installed only in the main thread.

    Under torchrun (``distributed=True``) ranks must stop at the same step: every training step
    all-reduces :meth:`local_flag` (with the step's statistics) and reports the result to
    :meth:`note_agreed`; after an evaluation, which has no such per-step agreement,
    :meth:`agree` runs one small all-reduce (every rank must call it at the same point).
    """

    def __init__(self, distributed: bool = False, device: torch.device | None = None) -> None:
        self.distributed, self.device = distributed, device
        self.signum: int | None = None  # this process's signal
        self.agreed: int | None = None  # under torchrun: the signal all ranks agreed on
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> int | None:
        """The signal that asks to stop; under torchrun the one all ranks agreed on."""
        return self.agreed if self.distributed else self.signum

    def local_flag(self) -> float:
        """This process's signal number (0: none), to be all-reduced with the step's sums."""
        return float(self.signum or 0)

    def note_agreed(self, any_signal: float) -> None:
        """The all-reduced :meth:`local_flag` of a step: > 0 when some rank got a signal."""
        if any_signal > 0:
            self.agreed = self.signum or signal.SIGTERM

    def agree(self) -> int | None:
        """:meth:`requested`, after agreeing across ranks whether any got a signal since the last
        step."""
        if self.distributed and self.agreed is None:
            local = self.signum or 0
            flag = torch.tensor([float(local)], dtype=torch.float64, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                self.agreed = local or int(flag.item())
        return self.requested()
