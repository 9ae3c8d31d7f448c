"""Reports on sweeps: the runs of a ``samkit sweep`` directory aggregated over seeds, with
confidence intervals, paired differences against a baseline, tables and plots.

* :mod:`samkit.report.stats`: ``mean_ci`` (Student-t interval), ``paired_difference``;
* :mod:`samkit.report.aggregate`: ``load_sweep`` (sweep.json and every run through
  :mod:`samkit.rundir`), cells, learning curves, the baseline rule;
* :mod:`samkit.report.tables`, :mod:`samkit.report.plots`: Markdown / text tables, PNGs;
* :mod:`samkit.report.build`: ``build_report`` (every number, as a dict), ``save_report``
  and ``write_report`` (both in one call).

``samkit report`` (:mod:`samkit.cli.report`) is the command; docs/report.md describes both.
"""

from samkit.report.aggregate import (
    METRICS,
    SWEEP_FILE,
    BaselineError,
    Cell,
    Comparison,
    CurvePoint,
    Run,
    Sweep,
    baseline_map,
    compare_to_baseline,
    learning_curves,
    load_sweep,
    numeric_flags,
    x_flags,
)
from samkit.report.build import REPORT_DIR, build_report, save_report, write_report
from samkit.report.stats import Estimate, PairedDifference, mean_ci, paired_difference
from samkit.report.tables import cells_table, differences_table, tables_text

__all__ = [
    "METRICS",
    "REPORT_DIR",
    "SWEEP_FILE",
    "BaselineError",
    "Cell",
    "Comparison",
    "CurvePoint",
    "Estimate",
    "PairedDifference",
    "Run",
    "Sweep",
    "baseline_map",
    "build_report",
    "cells_table",
    "compare_to_baseline",
    "differences_table",
    "learning_curves",
    "load_sweep",
    "mean_ci",
    "numeric_flags",
    "paired_difference",
    "save_report",
    "tables_text",
    "write_report",
    "x_flags",
]
