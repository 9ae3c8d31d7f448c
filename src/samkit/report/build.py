"""The report of a sweep as one JSON-able dict, and writing it: report.md, report.json, PNGs.

:func:`build_report` gathers every number (:mod:`samkit.report.aggregate`); the Markdown tables
(:mod:`samkit.report.tables`) and the plots (:mod:`samkit.report.plots`) are drawn from that dict,
so the files say the same thing. Seeds are JSON object keys, hence strings (``"0"``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from samkit._version import samkit_version
from samkit.report import plots, tables
from samkit.report.aggregate import (
    METRICS,
    BaselineError,
    Sweep,
    compare_to_baseline,
    gains_kept,
    learning_curves,
    load_sweep,
    x_flags,
)
from samkit.report.stats import Estimate
from samkit.rundir import write_json

__all__ = [
    "REPORT_DIR",
    "REPORT_FORMAT",
    "REPORT_JSON",
    "REPORT_MARKDOWN",
    "build_report",
    "save_report",
    "write_report",
]

REPORT_FORMAT = "samkit-report/1"
REPORT_DIR = "report"  # the default output directory, inside the sweep directory
REPORT_MARKDOWN = "report.md"
REPORT_JSON = "report.json"


def _estimate(est: Estimate | None) -> dict[str, Any] | None:
    if est is None:
        return None
    out = est.to_dict()
    if "differences" in out:
        out["differences"] = {str(s): v for s, v in out["differences"].items()}
    return out


def _cell_entry(sweep: Sweep, index: int, confidence: float) -> dict[str, Any]:
    cell = sweep.cells[index]
    metrics = {}
    for metric in METRICS:
        values = cell.values(metric)
        if values:
            metrics[metric] = {
                "values": {str(s): v for s, v in values.items()},
                "estimate": _estimate(cell.estimate(metric, confidence)),
            }
    curves = {
        key: [{"epoch": p.epoch, "mean": p.mean, "std": p.std, "n": p.n} for p in points]
        for key, points in learning_curves(cell).items()
    }
    return {
        "cell": cell.name,
        "variant": cell.variant,
        "varying": cell.varying,
        "flags": cell.flags,
        "seeds": cell.seeds,
        "completed": [r.seed for r in cell.completed],
        "missing": [
            {"seed": r.seed, "run_dir": str(r.run_dir), "status": r.status} for r in cell.missing
        ],
        "run_dirs": {str(r.seed): str(r.run_dir) for r in cell.runs},
        "metrics": metrics,
        "curves": curves,
    }


def build_report(
    sweep: Sweep,
    baseline: str | None = None,
    confidence: float = 0.95,
    yardstick: str | None = None,
) -> dict[str, Any]:
    """Every number of the report: per cell each metric's seed values and :class:`Estimate`,
    the learning curves, the paired differences against ``baseline`` (default: sweep.json's
    ``report.baseline``; none if neither is given) and, with a ``yardstick`` (default:
    ``report.yardstick``; e.g. SAM), each cell's share of the yardstick's gain over the baseline
    and its training time relative to the baseline (:func:`gains_kept`).

    :class:`BaselineError` for an unknown ``baseline`` or ``yardstick`` argument; ``ValueError``
    naming sweep.json for an unknown ``report.baseline`` / ``report.yardstick`` or a bad
    ``report.x``."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    source = "argument"
    if baseline is None and sweep.report.get("baseline") is not None:
        baseline, source = str(sweep.report["baseline"]), f"{sweep.manifest} report.baseline"
    comparisons = []
    if baseline is not None:
        try:
            comparisons = compare_to_baseline(sweep, baseline, confidence)
        except BaselineError as exc:
            if source == "argument":
                raise
            raise ValueError(f"{sweep.manifest}: report.baseline: {exc}") from None
    yard_source = "argument"
    if yardstick is None and sweep.report.get("yardstick") is not None:
        yardstick, yard_source = str(sweep.report["yardstick"]), "report.yardstick"
    gains = []
    if yardstick is not None and baseline is not None:
        try:
            gains = gains_kept(sweep, baseline, yardstick, confidence)
        except BaselineError as exc:
            if yard_source == "argument":
                raise
            raise ValueError(f"{sweep.manifest}: report.yardstick: {exc}") from None
    return {
        "format": REPORT_FORMAT,
        "samkit_version": samkit_version(),
        "sweep": {"name": sweep.name, "dir": str(sweep.path), "manifest": str(sweep.manifest)},
        "confidence": confidence,
        # where the test_* metrics were measured: "holdout" for runs with use_test_set = false
        "eval_splits": sorted({r.eval_split for c in sweep.cells for r in c.completed}),
        "baseline": baseline,
        "baseline_source": source if baseline is not None else None,
        "x": x_flags(sweep),
        "metrics": dict(METRICS),
        "cells": [_cell_entry(sweep, i, confidence) for i in range(len(sweep.cells))],
        "differences": [
            {
                "cell": c.cell,
                "baseline": c.baseline,
                "metrics": {m: _estimate(d) for m, d in c.differences.items()},
            }
            for c in comparisons
        ],
        "yardstick": yardstick if baseline is not None else None,
        "gains": [
            {
                "cell": g.cell,
                "baseline": g.baseline,
                "yardstick": g.yardstick,
                "share_of_gain": _estimate(g.share),
                "time_ratio": _estimate(g.time_ratio),
            }
            for g in gains
        ],
    }


def _write_text(path: Path, text: str) -> Path:
    """Write ``text`` atomically (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _previous_plots(out_dir: Path) -> list[Path]:
    """The PNGs listed by a report.json already in ``out_dir`` (to remove if not redrawn)."""
    try:
        old = json.loads((out_dir / REPORT_JSON).read_text(encoding="utf-8"))
        return [out_dir / Path(name).name for name in old["files"]["plots"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def save_report(report: dict[str, Any], out_dir: str | os.PathLike, *, plot: bool = True) -> Path:
    """Write ``report`` (from :func:`build_report`) into ``out_dir``: the PNG plots (unless
    ``plot=False``; those a previous report there drew and this one does not are removed),
    ``report.md`` and ``report.json`` (both atomically). Adds ``files`` (names relative to
    ``out_dir``) to ``report``; returns ``out_dir``. ``OSError`` when a file cannot be written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = _previous_plots(out)
    drawn = plots.plot_report(report, out) if plot else []
    for path in stale:
        if path not in drawn and path.suffix == ".png":
            path.unlink(missing_ok=True)
    report["files"] = {
        "markdown": REPORT_MARKDOWN,
        "json": REPORT_JSON,
        "plots": [p.name for p in drawn],
    }
    _write_text(out / REPORT_MARKDOWN, tables.report_markdown(report))
    write_json(out / REPORT_JSON, report, arrays=True)
    return out


def write_report(
    sweep_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    baseline: str | None = None,
    confidence: float = 0.95,
    *,
    plot: bool = True,
) -> dict[str, Any]:
    """:func:`load_sweep`, :func:`build_report` and :func:`save_report` into ``out_dir``
    (default ``SWEEP_DIR/report``): report.md, report.json (atomically) and the PNGs. Returns the
    report dict, its ``files`` naming what was written (relative to ``out_dir``). Errors as
    those functions'."""
    sweep = load_sweep(sweep_dir)
    report = build_report(sweep, baseline, confidence)
    save_report(report, out_dir if out_dir is not None else sweep.path / REPORT_DIR, plot=plot)
    return report
