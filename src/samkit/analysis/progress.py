"""Progress of the analysis loops (Lanczos, power iteration, SLQ, m-sharpness, landscapes) on
stderr.

On a terminal it is a ``tqdm`` bar. Anywhere else (a log file, a pipe, a batch job) a bar would be
a stream of carriage returns, so it is a plain line now and then instead::

    lanczos: 12/55 HVP (22%), 24 s elapsed, ETA 1 min 26 s
    lanczos: 55/55 HVP, done in 1 min 50 s

A line is written when at least :data:`LINE_INTERVAL` seconds have passed since the last one AND
either :data:`LINE_STEP` of the total more is done or :data:`LINE_SILENCE` seconds have passed
(so at most about 20 lines per loop, and at least one a minute while it runs); a loop that ends
before the first line writes nothing, and one that wrote lines writes a last one when it ends. The
ETA is the time per item so far times the items left; for a loop that stops at convergence
(Lanczos, power iteration) it counts to the most steps and says "ETA at most".
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["LINE_INTERVAL", "LINE_SILENCE", "LINE_STEP", "ProgressLines", "progress_bar"]

#: Seconds between two progress lines, at least.
LINE_INTERVAL = 10.0
#: Fraction of the total that must be done since the last line (unless LINE_SILENCE has passed).
LINE_STEP = 0.05
#: Seconds after which a line is written however little was done.
LINE_SILENCE = 60.0


def format_seconds(seconds: float) -> str:
    """``"45 s"``, ``"1 min 05 s"``, ``"2 h 03 min"``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class ProgressLines:
    """The non-terminal progress of the module docstring, with the part of ``tqdm``'s interface
    the analysis loops use: iterate over it, or ``update(n)``; ``close()`` (or a ``with`` block)
    writes the last line. ``clock`` is injectable for tests."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        file: TextIO | None = None,
        enabled: bool = True,
        may_stop_early: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.desc, self.unit = desc, unit
        self.file = file if file is not None else sys.stderr
        self.enabled = enabled
        self.eta_word = "ETA at most" if may_stop_early else "ETA"
        self.clock = clock
        self.n = 0
        self.lines = 0
        self.closed = False
        self.start = self._last_time = clock()
        self._last_n = 0
        self.interval, self.step, self.silence = LINE_INTERVAL, LINE_STEP, LINE_SILENCE

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "nothing to iterate over"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _write(self, text: str) -> None:
        prefix = f"{self.desc}: " if self.desc else ""
        print(prefix + text, file=self.file, flush=True)
        self.lines += 1

    def _count(self) -> str:
        return f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        now = self.clock()
        since = now - self._last_time
        if since < self.interval:
            return
        advanced = (self.n - self._last_n) / self.total if self.total else 1.0
        if advanced < self.step and since < self.silence:
            return
        elapsed = now - self.start
        text = self._count()
        if self.total:
            left = max(self.total - self.n, 0)
            eta = elapsed / self.n * left if self.n else float("nan")
            text += f" ({100 * self.n / self.total:.0f}%), {format_seconds(elapsed)} elapsed"
            text += f", {self.eta_word} {format_seconds(eta)}" if self.n else ""
        else:
            text += f", {format_seconds(elapsed)} elapsed"
        self._write(text)
        self._last_time, self._last_n = now, self.n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Accepted for ``tqdm`` compatibility; lines carry no postfix."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.enabled and self.lines:
            self._write(f"{self._count()}, done in {format_seconds(self.clock() - self.start)}")


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress_bar(
    iterable: Iterable[Any] | None,
    progress: bool | None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    may_stop_early: bool = False,
) -> Any:
    """Progress for an analysis loop, on stderr: ``progress=False`` none; otherwise a ``tqdm`` bar
    when stderr is a terminal and :class:`ProgressLines` when it is not (``None`` and ``True``
    are the same: a log file gets lines, never a bar). ``may_stop_early``: ``total`` is an upper
    bound (Lanczos, power iteration stop at convergence), so the lines say "ETA at most"."""
    stream = sys.stderr
    if progress is not False and _is_terminal(stream):
        return tqdm(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            file=stream,
            leave=False,
            dynamic_ncols=True,
        )
    return ProgressLines(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=stream,
        enabled=progress is not False,
        may_stop_early=may_stop_early,
    )
