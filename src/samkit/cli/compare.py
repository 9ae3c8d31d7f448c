"""``samkit compare``: a table and curves (test error, train loss, learning rate) of runs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from samkit._version import samkit_version
from samkit.analysis.compare import compare_runs, comparison_table, load_runs
from samkit.cli.analysis import files_written, report_files, run_command, write_results
from samkit.cli.args import CommandError, HelpFormatter
from samkit.rundir import RunDirError, find_runs

__all__ = ["add_command", "cmd_compare"]


def add_command(sub: argparse._SubParsersAction) -> None:
    """Register ``compare`` on the ``samkit`` parser's sub-commands."""
    p = sub.add_parser(
        "compare",
        help="table and curves (test error, train loss, learning rate) of several runs",
        description=(
            "Compare training runs: print a markdown table (final and best test error, time, "
            "images/s) and, with --output, write it (comparison.md, comparison.json) with PNG "
            "curves of the test error, train loss and learning rate against the epoch. A "
            "directory without metrics.jsonl stands for every run directory below it."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("runs", metavar="RUN_DIR", nargs="+", help="run directories (metrics.jsonl)")
    p.add_argument("--output", metavar="DIR", default=None, help="write the table and curves here")
    p.add_argument(
        "--names",
        metavar="NAME",
        nargs="+",
        default=None,
        help="display names, one per run (default: the shortest unique path suffixes)",
    )
    p.add_argument(
        "--format",
        choices=("markdown", "text"),
        default="markdown",
        help="format of the printed table (the file is always markdown)",
    )
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    """``samkit compare``: see :func:`add_command`."""
    return run_command("compare", lambda: _compare(args))


def _expand_runs(paths: Sequence[str]) -> list[Path]:
    """Each path as a run directory, or (without ``metrics.jsonl``) every run directory below."""
    runs: list[Path] = []
    for text in paths:
        try:
            runs.extend(find_runs(text))
        except RunDirError as exc:
            raise CommandError(str(exc)) from None
    return list(dict.fromkeys(runs))


def _compare(args: argparse.Namespace) -> None:
    runs = _expand_runs(args.runs)
    if args.names is not None and len(args.names) != len(runs):
        raise CommandError(f"--names: {len(args.names)} names for {len(runs)} runs")
    written: list[Path] = []
    try:
        if args.output is None:
            loaded = load_runs(runs, args.names)
            print(comparison_table(loaded, fmt=args.format), end="")
            return
        out = Path(args.output)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommandError(f"--output: cannot create {out} ({exc.strerror or exc})") from None
        with files_written(written):
            report = compare_runs(runs, out, names=args.names)
            written.append(out / "comparison.md")
            written.append(
                write_results(
                    out / "comparison.json",
                    {
                        "command": "compare",
                        "samkit_version": samkit_version(),
                        "runs": [str(r) for r in runs],
                        "rows": report.rows,
                        "columns": "error rates as fractions, time in seconds",
                        "plots": {k: v.name for k, v in report.plots.items()},
                    },
                )
            )
            written.extend(report.plots.values())
    except RunDirError as exc:
        raise CommandError(str(exc)) from None
    table = report.table
    if args.format != "markdown":
        table = comparison_table(load_runs(runs, args.names), fmt=args.format)
    print(table, end="")
    report_files(written)
