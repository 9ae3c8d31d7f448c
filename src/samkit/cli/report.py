"""``samkit report``: aggregate a sweep's runs over seeds (means, confidence intervals, paired
differences against a baseline) into report.md, report.json and PNG plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from samkit.cli.analysis import files_written, report_files, run_command
from samkit.cli.args import CommandError, HelpFormatter, number
from samkit.domains import Interval
from samkit.report import (
    REPORT_DIR,
    SWEEP_FILE,
    BaselineError,
    build_report,
    load_sweep,
    save_report,
    tables_text,
)
from samkit.report.aggregate import YardstickError
from samkit.report.build import REPORT_JSON, REPORT_MARKDOWN

__all__ = ["add_command", "cmd_report"]

confidence_level = number(float, Interval(0, 1, low_open=True, high_open=True))


def add_command(sub: argparse._SubParsersAction) -> None:
    """Register ``report`` on the ``samkit`` parser's sub-commands."""
    p = sub.add_parser(
        "report",
        help="aggregate a sweep over seeds: means with confidence intervals, paired "
        "differences against a baseline, tables and plots",
        description=(
            f"Read SWEEP_DIR/{SWEEP_FILE} (written by samkit sweep) and every run directory it "
            "lists; average each cell's completed runs over seeds (unfinished runs are counted "
            "as missing, never averaged), with Student-t confidence intervals, and compare each "
            "cell with its baseline cell seed by seed (paired t-test). Prints the tables and "
            f"writes {REPORT_MARKDOWN}, {REPORT_JSON} and PNG plots. See docs/report.md."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help=f"a sweep directory ({SWEEP_FILE})")
    p.add_argument(
        "--output",
        metavar="DIR",
        default=None,
        help=f"where to write the report (default: SWEEP_DIR/{REPORT_DIR})",
    )
    p.add_argument(
        "--baseline",
        metavar="CELL_OR_VARIANT",
        default=None,
        help="compare every cell with this variant at the same other varying values, or with "
        f"this one cell (default: {SWEEP_FILE}'s report.baseline; none without it)",
    )
    p.add_argument(
        "--yardstick",
        metavar="CELL_OR_VARIANT",
        default=None,
        help="with a baseline: each cell's share of this one's gain over the baseline, and its "
        f"training time over the baseline's (default: {SWEEP_FILE}'s report.yardstick)",
    )
    p.add_argument(
        "--confidence",
        metavar="C",
        type=confidence_level,
        default=0.95,
        help="confidence level of the intervals, in (0, 1)",
    )
    p.add_argument(
        "--format",
        choices=("markdown", "text"),
        default="markdown",
        help="format of the printed tables (report.md is always markdown)",
    )
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """``samkit report``: see :func:`add_command`."""
    return run_command("report", lambda: _report(args))


def _report(args: argparse.Namespace) -> None:
    sweep_dir = Path(args.sweep_dir)
    try:
        sweep = load_sweep(sweep_dir)
        report = build_report(sweep, args.baseline, args.confidence, args.yardstick)
    except YardstickError as exc:
        raise CommandError(f"--yardstick: {exc}") from None
    except BaselineError as exc:
        raise CommandError(f"--baseline: {exc}") from None
    except ValueError as exc:  # RunDirError is one: missing or corrupt files, bad sweep.json
        raise CommandError(str(exc)) from None
    except OSError as exc:  # an unreadable file
        where = f"{exc.filename}: " if exc.filename else ""
        raise CommandError(f"{where}cannot read ({exc.strerror or exc})") from None
    out = Path(args.output) if args.output is not None else sweep_dir / REPORT_DIR
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"--output: cannot create {out} ({exc.strerror or exc})") from None
    written: list[Path] = []
    with files_written(written):
        save_report(report, out)
    files = report["files"]
    written += [out / files["markdown"], out / files["json"]]
    written += [out / name for name in files["plots"]]
    print(tables_text(report, args.format), end="")
    report_files(written)
