"""A sweep's runs, read back and grouped: per cell and metric, each seed's value and the estimate.

``SWEEP_DIR/sweep.json`` (written by ``samkit sweep``) lists one entry per run::

    {"format": "samkit-sweep/1", "name": ..., "spec": {...},
     "report": {"baseline": ..., "x": [...]},
     "cells": [{"cell": NAME, "variant": V, "seed": S, "flags": {...}, "varying": {...},
                "run_dir": PATH relative to SWEEP_DIR}, ...]}

Entries with the same ``cell`` are one cell, its seeds the repetitions. Each run directory is
read through :mod:`samkit.rundir`. A run counts only when its ``summary.json`` has status
"completed"; any other run (no directory, no summary, another status) is *missing*: listed,
never averaged. The metrics of a completed run (:data:`METRICS`):

    test_error                               summary.json final_test_error_rate
    best_test_error                          summary.json best_test_error_rate
    train_loss                               the last metrics.jsonl record's train_loss
    images_per_sec, train_seconds, wall_seconds   summary.json, same keys
    lambda_max, lambda_max_over_lambda_5     analysis/hessian.json, same keys, when present

**Baseline rule.** ``baseline`` names a variant or a cell. As a variant (some cell has that
``variant``), a cell's baseline is the cell whose ``varying`` dict equals its own except for
``variant``, which is ``baseline`` (``sam-label_noise=0.4`` -> ``sgd-label_noise=0.4``); a cell with
no such cell has none. Otherwise, as a cell name, that one cell is every other cell's baseline.
A cell is never compared with itself. Runs are paired by seed (completed in both cells).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samkit.report.stats import (
    Estimate,
    PairedDifference,
    mean_ci,
    paired_difference,
    ratio_of_means,
)
from samkit.rundir import ANALYSIS_DIR, RunDirError, read_metrics, read_summary
from samkit.rundir import layout as keys

__all__ = [
    "HESSIAN_FILE",
    "METRICS",
    "SWEEP_FILE",
    "SWEEP_FORMAT",
    "BaselineError",
    "Cell",
    "Comparison",
    "CurvePoint",
    "GainKept",
    "YardstickError",
    "Run",
    "Sweep",
    "baseline_map",
    "compare_to_baseline",
    "gains_kept",
    "learning_curves",
    "load_sweep",
    "numeric_flags",
    "read_run",
    "x_flags",
]

SWEEP_FILE = keys.SWEEP_FILE
SWEEP_FORMAT = keys.SWEEP_FORMAT
STATUS = keys.STATUS
COMPLETED = keys.COMPLETED
HESSIAN_FILE = keys.HESSIAN_FILE
LAMBDA_MAX = keys.LAMBDA_MAX
LAMBDA_MAX_OVER_LAMBDA_5 = keys.LAMBDA_MAX_OVER_LAMBDA_5

#: Metric name -> where it comes from (summary.json keys unless said otherwise).
METRICS: dict[str, str] = {
    "test_error": keys.FINAL_TEST_ERROR_RATE,
    "best_test_error": keys.BEST_TEST_ERROR_RATE,
    "train_loss": f"last {keys.METRICS_FILE} record's {keys.TRAIN_LOSS}",
    "images_per_sec": keys.IMAGES_PER_SEC,
    "train_seconds": keys.TRAIN_SECONDS,
    "wall_seconds": keys.WALL_SECONDS,
    "lambda_max": f"{ANALYSIS_DIR}/{HESSIAN_FILE} {LAMBDA_MAX}",
    "lambda_max_over_lambda_5": f"{ANALYSIS_DIR}/{HESSIAN_FILE} {LAMBDA_MAX_OVER_LAMBDA_5}",
}
_FROM_SUMMARY = {
    "test_error": keys.FINAL_TEST_ERROR_RATE,
    "best_test_error": keys.BEST_TEST_ERROR_RATE,
    "images_per_sec": keys.IMAGES_PER_SEC,
    "train_seconds": keys.TRAIN_SECONDS,
    "wall_seconds": keys.WALL_SECONDS,
}
_FROM_HESSIAN = {
    "lambda_max": LAMBDA_MAX,
    "lambda_max_over_lambda_5": LAMBDA_MAX_OVER_LAMBDA_5,
}
#: The per-epoch metrics averaged into learning curves.
CURVE_KEYS = (keys.TEST_ERROR_RATE, keys.TRAIN_LOSS)
#: The key of ``varying`` that names the variant (an optimizer setting, "sgd", "sam", ...).
VARIANT = "variant"


class BaselineError(ValueError):
    """A baseline that is neither a variant nor a cell of the sweep."""


@dataclass
class Run:
    """One seed of a cell: where it lives, whether it finished, and its numbers if it did."""

    seed: int
    run_dir: Path
    status: str  # "completed", another summary status, "no summary.json", "no run directory"
    values: dict[str, float] = field(default_factory=dict)
    curves: dict[str, dict[int | float, float]] = field(default_factory=dict)
    eval_split: str = "test"  # where the "test" metrics came from: "holdout" with use_test_set off

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED


@dataclass
class Cell:
    """The runs of one cell (same ``cell`` name in sweep.json), one per seed."""

    name: str
    variant: str | None
    varying: dict[str, Any]
    flags: dict[str, Any]
    runs: list[Run]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if r.completed]

    @property
    def missing(self) -> list[Run]:
        return [r for r in self.runs if not r.completed]

    def values(self, metric: str) -> dict[int, float]:
        """Seed -> value of ``metric`` over the completed runs that have it."""
        return {r.seed: r.values[metric] for r in self.completed if metric in r.values}

    def estimate(self, metric: str, confidence: float = 0.95) -> Estimate | None:
        """:func:`mean_ci` of :meth:`values`; None when no completed run has the metric."""
        values = self.values(metric)
        return mean_ci(values.values(), confidence) if values else None


@dataclass
class Sweep:
    """A sweep directory: its manifest's name, spec and report table, and its cells in order."""

    path: Path
    name: str
    spec: dict[str, Any]
    report: dict[str, Any]
    cells: list[Cell]

    @property
    def manifest(self) -> Path:
        return self.path / SWEEP_FILE

    def cell(self, name: str) -> Cell:
        for c in self.cells:
            if c.name == name:
                return c
        raise KeyError(name)


@dataclass(frozen=True)
class CurvePoint:
    """One epoch of a learning curve: mean and sample std (None for one seed) over ``n`` seeds."""

    epoch: int | float
    mean: float
    std: float | None
    n: int


@dataclass
class Comparison:
    """A cell against its baseline cell: per metric the paired difference (cell - baseline), or
    None when no seed has the metric in both."""

    cell: str
    baseline: str | None
    differences: dict[str, PairedDifference | None]


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A finite number (not a bool) as a float, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _read_manifest(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / SWEEP_FILE
    if not sweep_dir.is_dir():
        raise RunDirError(f"sweep directory not found: {sweep_dir}")
    if not path.is_file():
        raise RunDirError(f"{path}: no {SWEEP_FILE}; is {sweep_dir} a samkit sweep directory?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: corrupt file, not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if manifest.get("format") != SWEEP_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {SWEEP_FORMAT!r}")
    if not isinstance(manifest.get("cells"), list) or not manifest["cells"]:
        raise ValueError(f"{path}: 'cells' must be a non-empty list")
    for key in ("spec", "report"):
        if not isinstance(manifest.get(key, {}), dict):
            raise ValueError(f"{path}: {key!r} must be a JSON object")
    return manifest


def _check_entry(path: Path, i: int, entry: Any) -> None:
    where = f"{path}: cells[{i}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object")
    if not isinstance(entry.get("cell"), str) or not entry["cell"]:
        raise ValueError(f"{where}: 'cell' must be a non-empty string")
    seed = entry.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{where}: 'seed' must be an integer, got {seed!r}")
    if not isinstance(entry.get("run_dir"), str) or not entry["run_dir"]:
        raise ValueError(f"{where}: 'run_dir' must be a non-empty string")
    for key in ("varying", "flags"):
        if not isinstance(entry.get(key, {}), dict):
            raise ValueError(f"{where}: {key!r} must be a JSON object")


def _read_hessian(run_dir: Path) -> dict[str, float]:
    path = run_dir / ANALYSIS_DIR / HESSIAN_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: corrupt file, not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: corrupt file, expected a JSON object")
    out = {m: _number(data.get(k)) for m, k in _FROM_HESSIAN.items()}
    return {m: v for m, v in out.items() if v is not None}


def _epoch_curves(records: list[dict[str, Any]]) -> dict[str, dict[int | float, float]]:
    curves: dict[str, dict[int | float, float]] = {k: {} for k in CURVE_KEYS}
    for rec in records:
        epoch = rec.get(keys.EPOCH)
        if rec.get(keys.PARTIAL_EPOCH) is True or _number(epoch) is None:
            continue
        for key in CURVE_KEYS:
            value = _number(rec.get(key))
            if value is not None:
                curves[key][epoch] = value
    return curves


def read_run(run_dir: Path, seed: int) -> Run:
    """One run: its status and, when completed, its :data:`METRICS` and per-epoch curves."""
    if not run_dir.is_dir():
        return Run(seed, run_dir, "no run directory")
    summary = read_summary(run_dir)
    if not summary:
        return Run(seed, run_dir, f"no {keys.SUMMARY_FILE}")
    status = summary.get(STATUS)
    if status != COMPLETED:
        return Run(seed, run_dir, f"status {status!r}")
    values = {m: _number(summary.get(k)) for m, k in _FROM_SUMMARY.items()}
    records = read_metrics(run_dir)
    values["train_loss"] = _number(records[-1].get(keys.TRAIN_LOSS))
    values.update(_read_hessian(run_dir))
    kept = {m: v for m, v in values.items() if v is not None}
    split = str(summary.get("eval_split", "test"))
    return Run(seed, run_dir, COMPLETED, kept, _epoch_curves(records), split)


def load_sweep(sweep_dir: str | os.PathLike) -> Sweep:
    """Read ``SWEEP_DIR/sweep.json`` and every listed run directory.

    :class:`~samkit.rundir.RunDirError` (a ``ValueError``) names the file for a missing sweep
    directory or sweep.json, corrupt JSON, or a corrupt file of a completed run; ``ValueError``
    names sweep.json and the entry for a malformed manifest (a seed listed twice for a cell, ...).
    """
    sweep_dir = Path(sweep_dir)
    manifest = _read_manifest(sweep_dir)
    path = sweep_dir / SWEEP_FILE
    cells: dict[str, Cell] = {}
    for i, entry in enumerate(manifest["cells"]):
        _check_entry(path, i, entry)
        varying = dict(entry.get("varying", {}))
        variant = entry.get("variant", varying.get(VARIANT))
        flags = {k: v for k, v in entry.get("flags", {}).items() if k != "seed"}
        cell = cells.setdefault(
            entry["cell"], Cell(entry["cell"], variant, varying, flags, runs=[])
        )
        if entry["seed"] in cell.seeds:
            raise ValueError(
                f"{path}: cells[{i}]: cell {cell.name!r} lists seed {entry['seed']} twice"
            )
        if varying != cell.varying:
            raise ValueError(f"{path}: cells[{i}]: cell {cell.name!r} has two 'varying' dicts")
        run_dir = sweep_dir / entry["run_dir"]  # an absolute run_dir stays as it is
        cell.runs.append(read_run(run_dir, entry["seed"]))
    return Sweep(
        sweep_dir,
        str(manifest.get("name", sweep_dir.name)),
        manifest.get("spec", {}),
        manifest.get("report", {}),
        list(cells.values()),
    )


# --------------------------------------------------------------------------------------------
# Curves, baselines, x flags
# --------------------------------------------------------------------------------------------


def learning_curves(cell: Cell) -> dict[str, list[CurvePoint]]:
    """Per curve key (``test_error_rate``, ``train_loss``), per epoch that any completed run
    recorded: the mean and sample std (ddof 1; None for one run) over the runs that have it."""
    out: dict[str, list[CurvePoint]] = {}
    for key in CURVE_KEYS:
        epochs = sorted({e for r in cell.completed for e in r.curves.get(key, {})})
        points = []
        for epoch in epochs:
            values = [
                r.curves[key][epoch] for r in cell.completed if epoch in r.curves.get(key, {})
            ]
            est = mean_ci(values)
            points.append(CurvePoint(epoch, est.mean, est.std, est.n))
        out[key] = points
    return out


def _others(cell: Cell) -> dict[str, Any]:
    return {k: v for k, v in cell.varying.items() if k != VARIANT}


def baseline_map(sweep: Sweep, baseline: str) -> dict[str, str | None]:
    """Cell name -> the name of its baseline cell (None: none, or the baseline itself), by the
    rule of the module docstring. :class:`BaselineError` when ``baseline`` is neither a variant
    nor a cell of the sweep."""
    variants = list(dict.fromkeys(c.variant for c in sweep.cells if c.variant is not None))
    if baseline in variants:
        out: dict[str, str | None] = {}
        for cell in sweep.cells:
            match = next(
                (b for b in sweep.cells if b.variant == baseline and _others(b) == _others(cell)),
                None,
            )
            out[cell.name] = match.name if match is not None and match is not cell else None
        return out
    names = [c.name for c in sweep.cells]
    if baseline in names:
        return {n: (baseline if n != baseline else None) for n in names}
    raise BaselineError(
        f"unknown baseline {baseline!r}: not a variant ({', '.join(map(str, variants)) or 'none'})"
        f" nor a cell ({', '.join(names)}) of the sweep"
    )


def compare_to_baseline(sweep: Sweep, baseline: str, confidence: float = 0.95) -> list[Comparison]:
    """Every cell but the baseline cells themselves against its baseline cell: per metric the
    :func:`paired_difference` ``cell - baseline`` over the seeds completed in both."""
    out = []
    for name, base in baseline_map(sweep, baseline).items():
        if name == baseline or (base is None and sweep.cell(name).variant == baseline):
            continue  # a baseline cell itself
        diffs: dict[str, PairedDifference | None] = {}
        for metric in METRICS:
            a = sweep.cell(name).values(metric)
            b = sweep.cell(base).values(metric) if base is not None else {}
            common = set(a) & set(b)
            diffs[metric] = paired_difference(a, b, confidence) if common else None
        out.append(Comparison(name, base, diffs))
    return out


class YardstickError(BaselineError):
    """An unknown yardstick (as :class:`BaselineError` for the baseline)."""


@dataclass(frozen=True)
class GainKept:
    """A cell's share of the yardstick's gain over the baseline, and its cost:
    ``sum(baseline - cell) / sum(baseline - yardstick)`` of the final test error over the seeds
    completed in all three (Fieller's interval: :func:`ratio_of_means`; unbounded when the
    yardstick's own gain is not significant), and ``cell / baseline`` of the training time."""

    cell: str
    baseline: str
    yardstick: str
    share: Estimate | None
    time_ratio: Estimate | None


def gains_kept(
    sweep: Sweep, baseline: str, yardstick: str, confidence: float = 0.95
) -> list[GainKept]:
    """:class:`GainKept` of every cell that has a baseline and a yardstick cell (both by the
    rule of :func:`baseline_map`; the yardstick cells themselves included, at 1)."""
    bases = baseline_map(sweep, baseline)
    try:
        yards = baseline_map(sweep, yardstick)
    except BaselineError as exc:
        raise YardstickError(str(exc).replace("baseline", "yardstick", 1)) from None
    out = []
    for cell in sweep.cells:
        base = bases[cell.name]
        yard = (
            cell.name if cell.variant == yardstick or cell.name == yardstick else yards[cell.name]
        )
        if base is None or yard is None:
            continue
        c, b = cell.values("test_error"), sweep.cell(base).values("test_error")
        y = sweep.cell(yard).values("test_error")
        seeds = [s for s in cell.seeds if s in c and s in b and s in y]
        share = (
            ratio_of_means([b[s] - c[s] for s in seeds], [b[s] - y[s] for s in seeds], confidence)
            if seeds
            else None
        )
        ct, bt = cell.values("train_seconds"), sweep.cell(base).values("train_seconds")
        ratios = [ct[s] / bt[s] for s in seeds if s in ct and s in bt and bt[s] > 0]
        time_ratio = mean_ci(ratios, confidence) if ratios else None
        out.append(GainKept(cell.name, base, yard, share, time_ratio))
    return out


def numeric_flags(sweep: Sweep) -> list[str]:
    """The varying flags (not ``variant``) whose values are numbers in every cell, with at least
    two distinct values, in the order of the first cell's ``varying``."""
    names = list(dict.fromkeys(k for c in sweep.cells for k in c.varying if k != VARIANT))
    out = []
    for name in names:
        values = [c.varying.get(name) for c in sweep.cells]
        if all(_number(v) is not None for v in values) and len(set(values)) > 1:
            out.append(name)
    return out


def x_flags(sweep: Sweep) -> list[str]:
    """The flags to plot the test error against: sweep.json's ``report.x`` if given, else
    :func:`numeric_flags`. A ``report.x`` flag that is not a number in every cell is
    ``ValueError`` naming sweep.json; one that takes a single value here (a sweep run on part of
    its grid) is left out, as there is nothing to plot against it."""
    numeric = numeric_flags(sweep)
    chosen = sweep.report.get("x")
    if chosen is None:
        return numeric
    if isinstance(chosen, str):
        chosen = [chosen]
    if not isinstance(chosen, list):
        raise ValueError(f"{sweep.manifest}: report.x must be a list of flag names")
    for x in chosen:
        values = [c.varying.get(x) for c in sweep.cells]
        if x == VARIANT or not all(_number(v) is not None for v in values):
            raise ValueError(
                f"{sweep.manifest}: report.x names {x!r}, not a numeric varying flag "
                f"(these are: {', '.join(numeric) or 'none'})"
            )
    return [x for x in chosen if x in numeric]
