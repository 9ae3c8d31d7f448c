"""The report's PNG plots, from the dict of :func:`samkit.report.build.build_report`.

* ``test_error_vs_{flag}.png`` for each x flag: the test error (%) against the flag's value, one
  line per combination of the other varying values (the variant among them), error bars = the
  confidence interval; a log x axis when every value is positive and they span more than 10x
  (``sam_m`` 1..128, say).
* ``accuracy_vs_cost.png``: test accuracy (%) against training time (``train_seconds``), one
  labelled point per cell, both with confidence-interval bars.
* ``learning_curves.png``: test error (%) per epoch, one line per cell, the band mean ± std over
  seeds; with more than :data:`CURVES_PER_PLOT` cells, ``learning_curves_1.png``, ``_2`` ...

matplotlib is imported inside the functions that draw (the numbers do not need it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from samkit.rundir import layout as keys

__all__ = [
    "CURVES_PER_PLOT",
    "log_x",
    "plot_accuracy_vs_cost",
    "plot_error_vs_flag",
    "plot_learning_curves",
    "plot_report",
]

CURVES_PER_PLOT = 8
VARIANT = "variant"


def _figure(size: tuple[float, float] = (6.5, 4.5)) -> Any:
    """A Figure on an Agg canvas, without pyplot or the global backend."""
    # Deferred: matplotlib is heavy and only needed when a plot is drawn.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _half(est: dict[str, Any]) -> float:
    return est["half_width"] if est.get("half_width") is not None else 0.0


def _conf(report: dict[str, Any]) -> str:
    return f"{report['confidence'] * 100:g}% CI"


def _line_label(cell: dict[str, Any], flag: str) -> str:
    """The cell's varying values other than ``flag``: ``sam, rho=0.05`` (variant unnamed)."""
    parts = [str(cell["variant"])] if cell.get("variant") is not None else []
    parts += [f"{k}={v}" for k, v in cell["varying"].items() if k not in (flag, VARIANT)]
    return ", ".join(parts) or "all"


def log_x(values: list[float]) -> bool:
    """A log x axis: every value positive and ``max / min > 10`` (base 2 for integers)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def plot_error_vs_flag(report: dict[str, Any], flag: str, path: Path) -> Path | None:
    """Test error (%) against ``flag``, one line per other varying combination, CI bars; None
    when no cell has both."""
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for cell in report["cells"]:
        entry, x = cell["metrics"].get("test_error"), cell["varying"].get(flag)
        if entry is None or x is None:
            continue
        est = entry["estimate"]
        lines.setdefault(_line_label(cell, flag), []).append(
            (float(x), est["mean"] * 100, _half(est) * 100)
        )
    if not lines:
        return None
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, points in lines.items():
        xs, ys, hs = zip(*sorted(points))
        ax.errorbar(xs, ys, yerr=hs, marker="o", capsize=3, label=label)
    xs_all = [p[0] for pts in lines.values() for p in pts]
    if log_x(xs_all):
        ax.set_xscale("log", base=2 if all(float(x).is_integer() for x in xs_all) else 10)
    ax.set_xlabel(flag)
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{report['sweep']['name']}: test error vs {flag} (mean, {_conf(report)})")
    ax.grid(True, alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_accuracy_vs_cost(report: dict[str, Any], path: Path) -> Path | None:
    """Test accuracy (%) = 100 (1 - test error) against ``train_seconds``, one labelled point per
    cell with CI bars on both axes; None when no cell has both."""
    points = []
    for cell in report["cells"]:
        err, sec = cell["metrics"].get("test_error"), cell["metrics"].get("train_seconds")
        if err is None or sec is None:
            continue
        e, s = err["estimate"], sec["estimate"]
        points.append((cell["cell"], s["mean"], _half(s), 100 * (1 - e["mean"]), 100 * _half(e)))
    if not points:
        return None
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, x, xh, y, yh in points:
        ax.errorbar([x], [y], xerr=[xh], yerr=[yh], marker="o", capsize=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{report['sweep']['name']}: accuracy vs cost (mean, {_conf(report)})")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_learning_curves(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Test error (%) per epoch, a line per cell with a mean ± std band, at most
    :data:`CURVES_PER_PLOT` cells per PNG."""
    from matplotlib.ticker import MaxNLocator  # deferred with the rest of matplotlib

    cells = [c for c in report["cells"] if c["curves"].get(keys.TEST_ERROR_RATE)]
    chunks = [cells[i : i + CURVES_PER_PLOT] for i in range(0, len(cells), CURVES_PER_PLOT)]
    written = []
    for i, chunk in enumerate(chunks, start=1):
        fig = _figure()
        ax = fig.add_subplot(1, 1, 1)
        for cell in chunk:
            curve = cell["curves"][keys.TEST_ERROR_RATE]
            xs = [p["epoch"] for p in curve]
            ys = [p["mean"] * 100 for p in curve]
            sd = [(p["std"] or 0.0) * 100 for p in curve]
            (line,) = ax.plot(xs, ys, marker=".", label=cell["cell"])
            ax.fill_between(
                xs,
                [y - s for y, s in zip(ys, sd)],
                [y + s for y, s in zip(ys, sd)],
                color=line.get_color(),
                alpha=0.2,
            )
        part = f" ({i}/{len(chunks)})" if len(chunks) > 1 else ""
        ax.set_title(f"{report['sweep']['name']}: test error per epoch (mean ± std){part}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test error (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
        name = f"learning_curves_{i}.png" if len(chunks) > 1 else "learning_curves.png"
        written.append(_save(fig, out_dir / name))
    return written


def plot_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Every plot of the report (module docstring) into ``out_dir``; the paths written."""
    written = []
    for flag in report["x"]:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", flag)
        path = plot_error_vs_flag(report, flag, out_dir / f"test_error_vs_{safe}.png")
        if path is not None:
            written.append(path)
    path = plot_accuracy_vs_cost(report, out_dir / "accuracy_vs_cost.png")
    if path is not None:
        written.append(path)
    written.extend(plot_learning_curves(report, out_dir))
    return written
