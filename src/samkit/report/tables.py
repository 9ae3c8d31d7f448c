"""The report's tables, from the dict of :func:`samkit.report.build.build_report`.

Each number is ``mean ± h`` with ``h`` the half-width of the Student-t confidence interval
over the seeds (just ``mean`` for one seed); ``-`` where no completed run has the metric. ``n``
is the number of completed runs, ``k/m`` when only k of the cell's m seeds completed.
"""

from __future__ import annotations

from typing import Any, Literal

from samkit.analysis.compare import render_table

__all__ = ["cells_table", "differences_table", "gains_table", "report_markdown", "tables_text"]

Format = Literal["markdown", "text"]

#: Columns of the cells table: (metric, header, scale, format of one number).
CELL_COLUMNS: tuple[tuple[str, str, float, str], ...] = (
    ("test_error", "test error (%)", 100.0, ".2f"),
    ("best_test_error", "best test error (%)", 100.0, ".2f"),
    ("train_loss", "train loss", 1.0, ".4g"),
    ("images_per_sec", "images/s", 1.0, ".0f"),
    ("wall_seconds", "wall time (s)", 1.0, ".1f"),
    ("lambda_max", "lambda_max", 1.0, ".4g"),
    ("lambda_max_over_lambda_5", "lambda_max/lambda_5", 1.0, ".4g"),
)
#: Columns shown only when some cell has the metric.
OPTIONAL = ("lambda_max", "lambda_max_over_lambda_5")


def _pm(est: dict[str, Any] | None, scale: float, spec: str, sign: bool = False) -> str:
    """``mean ± half_width`` (scaled), ``mean`` alone without a half-width, ``-`` for None."""
    if est is None:
        return "-"
    mean = format(est["mean"] * scale, ("+" if sign else "") + spec)
    if est.get("half_width") is None:
        return mean
    return f"{mean} ± {format(est['half_width'] * scale, spec)}"


def cells_table(report: dict[str, Any], fmt: Format = "markdown") -> str:
    """One row per cell: n, then each metric of :data:`CELL_COLUMNS` as ``mean ± h``."""
    cells = report["cells"]
    columns = [
        c
        for c in CELL_COLUMNS
        if c[0] not in OPTIONAL or any(c[0] in cell["metrics"] for cell in cells)
    ]
    header = ["cell", "n", *(c[1] for c in columns)]
    rows = []
    for cell in cells:
        done, listed = len(cell["completed"]), len(cell["seeds"])
        n = str(done) if done == listed else f"{done}/{listed}"
        row = [cell["cell"], n]
        for metric, _, scale, spec in columns:
            entry = cell["metrics"].get(metric)
            row.append(_pm(entry["estimate"] if entry else None, scale, spec))
        rows.append(row)
    return render_table(header, rows, fmt)


def differences_table(report: dict[str, Any], fmt: Format = "markdown") -> str:
    """One row per compared cell: its baseline cell, the seed pairs, the paired difference of
    the test error (cell - baseline, percentage points) ``mean ± h``, its interval and p."""
    header = ["cell", "baseline", "pairs", "Δ test error (pp)", "CI (pp)", "p"]
    rows = []
    for comp in report["differences"]:
        d = comp["metrics"].get("test_error")
        if d is None:
            rows.append([comp["cell"], comp["baseline"] or "-", "0", "-", "-", "-"])
            continue
        ci = (
            f"[{d['ci_low'] * 100:+.2f}, {d['ci_high'] * 100:+.2f}]"
            if d["ci_low"] is not None
            else "-"
        )
        p = format(d["p_value"], ".3g") if d["p_value"] is not None else "-"
        rows.append(
            [comp["cell"], comp["baseline"], str(d["n_pairs"]), _pm(d, 100.0, ".2f", True), ci, p]
        )
    return render_table(header, rows, fmt)


def gains_table(report: dict[str, Any], fmt: Format = "markdown") -> str:
    """One row per cell with a yardstick: its share of the yardstick's gain over the baseline
    (1 = all of it, 0 = none, negative = worse than the baseline) and its training time in units
    of the baseline's, each ``mean ± h`` over the seeds."""
    header = ["cell", "baseline", "yardstick", "share of the gain", "CI", "time x baseline"]
    rows = []
    for g in report.get("gains", []):
        s = g["share_of_gain"]
        share = "-" if s is None else format(s["mean"], ".2f")
        ci = "unbounded" if s is not None and s["n"] > 1 and s["ci_low"] is None else "-"
        if s is not None and s["ci_low"] is not None:
            ci = f"[{s['ci_low']:.2f}, {s['ci_high']:.2f}]"
        rows.append(
            [g["cell"], g["baseline"], g["yardstick"], share, ci, _pm(g["time_ratio"], 1.0, ".2f")]
        )
    return render_table(header, rows, fmt)


def tables_text(report: dict[str, Any], fmt: Format = "markdown") -> str:
    """The cells table and, with a baseline, the differences table (what ``samkit report``
    prints)."""
    conf = f"{report['confidence'] * 100:g}%"
    text = cells_table(report, fmt)
    text += f"\n(mean ± half-width of the {conf} t-interval over seeds)\n"
    if report["baseline"] is not None:
        text += f"\nPaired differences vs baseline {report['baseline']!r}:\n\n"
        text += differences_table(report, fmt)
    if report.get("gains"):
        text += f"\nShare of {report['yardstick']!r}'s gain over the baseline, and cost:\n\n"
        text += gains_table(report, fmt)
    return text


def _holdout_lines(eval_splits: list[str]) -> list[str]:
    """A warning above the table when runs were evaluated on the holdout, not the test set."""
    if "holdout" not in eval_splits:
        return []
    which = "" if eval_splits == ["holdout"] else " for those runs"
    return [
        "**Evaluated on the holdout** (`use_test_set = false`): every test error below is a "
        f"holdout error{which}.",
        "",
    ]


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: a title, what was read, both tables, the missing runs and the plots."""
    sweep, conf = report["sweep"], report["confidence"]
    lines = [
        f"# Sweep report: {sweep['name']}",
        "",
        f"Sweep directory `{sweep['dir']}`; {len(report['cells'])} cells. Each entry is the "
        f"mean over the completed seeds ± the half-width of the {conf * 100:g}% Student-t "
        "interval (mean alone for one seed); `n` counts completed runs (`k/m`: k of m seeds).",
        "",
        *_holdout_lines(report.get("eval_splits", [])),
        cells_table(report),
    ]
    if report["baseline"] is not None:
        lines += [
            f"## Paired differences vs baseline `{report['baseline']}`",
            "",
            "Test error of each cell minus its baseline cell's, seed by seed, in percentage "
            "points; p: two-sided paired t-test.",
            "",
            differences_table(report),
        ]
    if report.get("gains"):
        lines += [
            f"## Share of `{report['yardstick']}`'s gain, and cost",
            "",
            "sum(baseline - cell) / sum(baseline - yardstick) of the final test error over the "
            "seeds (1: the cell keeps all of the yardstick's gain over the baseline, 0: none), "
            "with Fieller's interval (unbounded when the yardstick's own gain is not "
            "significant); and the cell's training time over the baseline's, mean ± half-width "
            "of the t-interval (runs measured side by side share the machine: a rough cost).",
            "",
            gains_table(report),
        ]
    missing = [(c["cell"], m) for c in report["cells"] for m in c["missing"]]
    if missing:
        lines += ["## Missing runs (not averaged)", ""]
        lines += [
            f"- `{cell}` seed {m['seed']}: {m['status']} (`{m['run_dir']}`)" for cell, m in missing
        ]
        lines.append("")
    names = report.get("files", {}).get("plots", [])
    if names:
        lines += ["## Plots", ""] + [f"![{n}]({n})" for n in names] + [""]
    return "\n".join(lines)
