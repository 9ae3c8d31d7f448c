"""Compare training runs: a table of final numbers and curves per epoch.

A run directory (:mod:`samkit.rundir`) holds ``metrics.jsonl`` (one record per epoch) and, once
finished, ``summary.json``; the keys read are the run-directory format's: per epoch ``epoch``,
``test_error_rate``, ``train_loss``, ``learning_rate``, ``images_per_sec``, ``wall_seconds``;
in the summary ``final_test_error_rate``, ``best_test_error_rate``, ``wall_seconds`` and
``images_per_sec``. Missing keys are shown as ``-``, and the columns fall back, in this order:

- final test error: the summary's ``final_test_error_rate``; ``1 - final_test_accuracy``; the
  last evaluated epoch's test error;
- best test error: ``best_test_error_rate``; ``1 - best_test_accuracy``; the minimum over epochs;
- time: the summary's ``wall_seconds``; the last epoch's ``wall_seconds``;
- images/s: the summary's ``images_per_sec``; the mean over epochs of ``images_per_sec``.

The test error of an epoch is its ``test_error_rate``, else ``1 - test_accuracy``. Runs written
by other tools are read as well when they use the same keys or, for the same quantities,
``test_error``, ``lr``, ``images_per_second``, ``total_time_sec`` / ``time_sec`` (summary, read
before ``wall_seconds``) and ``elapsed_sec`` (epochs, read before ``wall_seconds``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Literal

from samkit.analysis._utils import new_figure, save_figure
from samkit.rundir import RunDirError, read_metrics, read_summary
from samkit.rundir import layout as keys

__all__ = [
    "ComparisonReport",
    "RunData",
    "RunDirError",
    "compare_runs",
    "comparison_table",
    "load_run",
    "load_runs",
    "plot_run_curves",
    "render_table",
    "run_row",
]

#: Column key -> header of the comparison table.
COLUMNS: dict[str, str] = {
    "final_test_error": "final test error (%)",
    "best_test_error": "best test error (%)",
    "time_sec": "time (s)",
    "images_per_sec": "images/s",
}

#: Equivalent per-epoch keys, first match wins (see the module docstring).
TEST_ERROR_KEYS = (keys.TEST_ERROR_RATE, "test_error")
LEARNING_RATE_KEYS = (keys.LEARNING_RATE, "lr")
SPEED_KEYS = (keys.IMAGES_PER_SEC, "images_per_second")
SUMMARY_TIME_KEYS = ("total_time_sec", keys.WALL_SECONDS, "time_sec")
EPOCH_TIME_KEYS = ("elapsed_sec", keys.WALL_SECONDS)

#: Curves drawn by :func:`plot_run_curves`: metric key -> (file stem, y label, scale to apply).
CURVES: dict[str, tuple[str, str, float]] = {
    keys.TEST_ERROR_RATE: ("test_error", "test error (%)", 100.0),
    keys.TRAIN_LOSS: ("train_loss", "train loss", 1.0),
    keys.LEARNING_RATE: ("learning_rate", "learning rate", 1.0),
}


@dataclasses.dataclass
class RunData:
    """One run: its display ``name``, directory, per-epoch ``metrics`` records and ``summary``."""

    name: str
    path: Path
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(epochs, values)`` of every record holding a finite number under ``key``; the epoch
        is the record's ``epoch`` or, without one, its 1-based position."""
        xs, ys = [], []
        for i, rec in enumerate(self.metrics, start=1):
            y = _number(rec.get(key))
            if y is None:
                continue
            x = _number(rec.get(keys.EPOCH))
            xs.append(x if x is not None else float(i))
            ys.append(y)
        return xs, ys

    def first_series(self, keys: Sequence[str]) -> tuple[list[float], list[float]]:
        """:meth:`series` of the first of ``keys`` that any record holds (empty if none does)."""
        for key in keys:
            xs, ys = self.series(key)
            if ys:
                return xs, ys
        return [], []

    def test_errors(self) -> tuple[list[float], list[float]]:
        """``(epochs, test error rates)``: ``test_error_rate`` / ``test_error``, else
        ``1 - test_accuracy``."""
        xs, ys = self.first_series(TEST_ERROR_KEYS)
        if ys:
            return xs, ys
        xs, acc = self.series(keys.TEST_ACCURACY)
        return xs, [1.0 - a for a in acc]

    def curve(self, key: str) -> tuple[list[float], list[float]]:
        """The per-epoch series plotted for ``key``, with the equivalent keys resolved."""
        if key == keys.TEST_ERROR_RATE:
            return self.test_errors()
        if key == keys.LEARNING_RATE:
            return self.first_series(LEARNING_RATE_KEYS)
        if key == keys.IMAGES_PER_SEC:
            return self.first_series(SPEED_KEYS)
        return self.series(key)


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, null, NaN, a string...)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def load_run(run_dir: str | PathLike[str], name: str | None = None) -> RunData:
    """Read ``metrics.jsonl`` (required, at least one record) and ``summary.json`` (optional).

    Raises :class:`RunDirError` naming the directory or file at fault.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"run directory not found: {path}")
    return RunData(
        name=name if name is not None else path.name,
        path=path,
        metrics=read_metrics(path),
        summary=read_summary(path),
    )


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """The shortest common number of trailing path parts that tells the runs apart."""
    parts = [p.resolve().parts for p in paths]
    longest = max((len(p) for p in parts), default=1)
    for depth in range(1, longest + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def load_runs(
    run_dirs: Sequence[str | PathLike[str]], names: Sequence[str] | None = None
) -> list[RunData]:
    """:func:`load_run` for each directory. Names default to the directory names, lengthened
    with parent directories until they are unique (``rho_0/seed_0`` vs ``rho_0.05/seed_0``)."""
    paths = [Path(d) for d in run_dirs]
    if not paths:
        raise ValueError("no run directories given")
    if names is not None and len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} run directories")
    labels = list(names) if names is not None else _unique_names(paths)
    return [load_run(p, n) for p, n in zip(paths, labels)]


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def _complement(value: Any) -> float | None:
    v = _number(value)
    return None if v is None else 1.0 - v


def run_row(run: RunData) -> dict[str, Any]:
    """The table row of a run: ``name`` and the :data:`COLUMNS` values (error rates as fractions,
    None where unknown), with the fallbacks of the module docstring."""
    s, last = run.summary, run.metrics[-1]
    _, errors = run.test_errors()
    _, speeds = run.first_series(SPEED_KEYS)
    return {
        "name": run.name,
        "final_test_error": _first(
            _number(s.get(keys.FINAL_TEST_ERROR_RATE)),
            _complement(s.get(keys.FINAL_TEST_ACCURACY)),
            errors[-1] if errors else None,
        ),
        "best_test_error": _first(
            _number(s.get(keys.BEST_TEST_ERROR_RATE)),
            _complement(s.get(keys.BEST_TEST_ACCURACY)),
            min(errors) if errors else None,
        ),
        "time_sec": _first(
            *(_number(s.get(k)) for k in SUMMARY_TIME_KEYS),
            *(_number(last.get(k)) for k in EPOCH_TIME_KEYS),
        ),
        "images_per_sec": _first(
            *(_number(s.get(k)) for k in SPEED_KEYS),
            sum(speeds) / len(speeds) if speeds else None,
        ),
    }


def _format(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key.endswith("test_error"):
        return f"{100.0 * value:.2f}"
    if key == "time_sec":
        return f"{value:.1f}"
    return f"{value:.0f}"


def comparison_table(
    runs: Sequence[RunData], *, fmt: Literal["markdown", "text"] = "markdown"
) -> str:
    """A table with one row per run: name, final and best test error (in %, 2 decimals), time
    (s, 1 decimal), images/s (integer); ``-`` where unknown. ``fmt="markdown"`` gives a GitHub
    table, ``"text"`` aligned columns. Ends with a newline."""
    header = ["run", *COLUMNS.values()]
    rows = []
    for run in runs:
        row = run_row(run)
        rows.append([row["name"], *(_format(k, row[k]) for k in COLUMNS)])
    return render_table(header, rows, fmt)


def render_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    fmt: Literal["markdown", "text"] = "markdown",
) -> str:
    """A GitHub Markdown table (first column left-aligned, the rest right-aligned) or, with
    ``fmt="text"``, aligned plain columns. Ends with a newline."""
    if fmt == "markdown":
        esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
        lines = ["| " + " | ".join(esc[0]) + " |", "|:---|" + "---:|" * (len(header) - 1)]
        lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    elif fmt == "text":
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(cells: Sequence[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
            return "  ".join([first, *rest]).rstrip()

        lines = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    else:
        raise ValueError(f"fmt must be 'markdown' or 'text', got {fmt!r}")
    return "\n".join(lines) + "\n"


def plot_run_curves(
    runs: Sequence[RunData],
    out_dir: str | PathLike[str],
    *,
    metrics: Sequence[str] = tuple(CURVES),
    prefix: str = "",
) -> dict[str, Path]:
    """One PNG per metric (default: test error in %, train loss, learning rate) with a line per
    run against the epoch, written to ``out_dir/{prefix}{stem}.png``. A metric that no run
    records is skipped. Returns metric key -> path."""
    out = Path(out_dir)
    written: dict[str, Path] = {}
    for key in metrics:
        stem, label, scale = CURVES.get(key, (key, key, 1.0))
        series = [(run.name, run.curve(key)) for run in runs]
        if not any(ys for _, (_, ys) in series):
            continue
        fig = new_figure((6.0, 4.0))
        ax = fig.add_subplot()
        for name, (xs, ys) in series:
            if ys:
                ax.plot(xs, [scale * y for y in ys], marker="o", ms=3, lw=1.5, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if key == keys.TRAIN_LOSS and all(y > 0 for _, (_, ys) in series for y in ys):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
        written[key] = save_figure(fig, out / f"{prefix}{stem}.png")
    return written


@dataclasses.dataclass
class ComparisonReport:
    """What :func:`compare_runs` produced: the table text, the rows and the PNG paths."""

    table: str
    rows: list[dict[str, Any]]
    plots: dict[str, Path]

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "rows": self.rows,
            "plots": {k: str(v) for k, v in self.plots.items()},
        }


def compare_runs(
    run_dirs: Sequence[str | PathLike[str]],
    out_dir: str | PathLike[str] | None = None,
    *,
    names: Sequence[str] | None = None,
    fmt: Literal["markdown", "text"] = "markdown",
) -> ComparisonReport:
    """Load the runs, build the table and, if ``out_dir`` is given, write the curves and
    ``comparison.md`` / ``comparison.txt`` there. The entry point for a ``samkit compare`` CLI."""
    runs = load_runs(run_dirs, names)
    table = comparison_table(runs, fmt=fmt)
    plots: dict[str, Path] = {}
    if out_dir is not None:
        out = Path(out_dir)
        plots = plot_run_curves(runs, out)
        out.mkdir(parents=True, exist_ok=True)
        (out / ("comparison.md" if fmt == "markdown" else "comparison.txt")).write_text(table)
    return ComparisonReport(table=table, rows=[run_row(r) for r in runs], plots=plots)
