"""The ``samkit`` command line (also ``python -m samkit``).

One module per command group, each adding its sub-commands to the parser built here:

* :mod:`samkit.cli.train`: ``train`` (flags derived from :class:`samkit.train.config.TrainConfig`)
  and ``evaluate``;
* :mod:`samkit.cli.analysis`: ``hessian`` and ``sharpness``; :mod:`samkit.cli.landscape`:
  ``landscape``; :mod:`samkit.cli.compare`: ``compare``; :mod:`samkit.cli.sweep`: ``sweep``;
  :mod:`samkit.cli.report`: ``report``.

Argument types, boolean flags and the one error style live in :mod:`samkit.cli.args`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch.distributed as dist

from samkit._version import samkit_version
from samkit.cli import analysis, compare, landscape, report, sweep
from samkit.cli import train as train_commands
from samkit.cli.args import PROG, Parser
from samkit.train.distributed import exit_without_teardown
from samkit.train.hooks import TrainHooks

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG, description="samkit: sharpness-aware minimization (SAM) for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {samkit_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train_commands.add_train_command(sub)
    train_commands.add_evaluate_command(sub)
    analysis.add_commands(sub)  # hessian, sharpness
    landscape.add_command(sub)
    compare.add_command(sub)
    sweep.add_command(sub)
    report.add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None, *, train_hooks: TrainHooks | None = None) -> int:
    """Entry point of the ``samkit`` console script; returns the exit status.

    ``train_hooks`` are passed to ``samkit train``'s loop (tests use them to slow a run down,
    make a rank fail or signal a run while it evaluates)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.func is train_commands.run_train:
        code = train_commands.run_train(args, hooks=train_hooks)
    else:
        code = args.func(args)
    if dist.is_available() and dist.is_initialized():  # under torchrun, after a finished run
        exit_without_teardown(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
