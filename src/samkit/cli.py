"""The ``samkit`` command line.

``samkit train`` trains a model with SAM / ESAM / SGD (no flags: the Fashion-MNIST main job; see
:mod:`samkit.train.loop`), ``samkit evaluate`` re-evaluates a run's checkpoint; their flags live
in :mod:`samkit.train.commands`. Heavy imports (torch) happen only when a command runs, so
``samkit --help`` is instant.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Sequence

__all__ = ["build_parser", "main"]

PROG = "samkit"


def repeats_local_rank_zero() -> bool:
    """True in a torchrun process other than its node's first (``LOCAL_RANK`` > 0 of a group).

    A usage error depends only on the command line and the node's files, so such a process would
    print local rank 0's message again (eight copies on an 8-GPU node); it exits silently instead.
    """
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ["LOCAL_RANK"]) > 0
    except (KeyError, ValueError):
        return False


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: ``samkit train: error: ...``.

    A flag with aliases (``--num-epochs/--num_epochs/--epochs``) is named by the spelling used.
    """

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):  # type: ignore[override]
        match = re.match(r"argument (\S+): ", message)
        if match and "/" in match.group(1):
            names = match.group(1).split("/")
            used = [a.split("=", 1)[0] for a in getattr(self, "_argv", [])]
            name = next((n for n in names if n in used), names[0])
            message = f"argument {name}: " + message[match.end() :]
        if repeats_local_rank_zero():
            self.exit(2)
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` unless the default is None or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _number(kind: type, check: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: v > 0, "a positive number")
non_negative_float = _number(float, lambda v: v >= 0, "a non-negative number")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("samkit")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def _add_train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from samkit.train.commands import add_train_command

    return add_train_command(sub)


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from samkit.train.commands import add_evaluate_command

    return add_evaluate_command(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="samkit: sharpness-aware minimization (SAM) for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    from samkit.analysis.commands import add_analysis_commands

    add_analysis_commands(sub)  # hessian, sharpness, landscape, compare
    return parser


def _fail(command: str, message: str, code: int = 2) -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return code


def _check_device(name: str) -> str | None:
    """An error message if ``name`` is not a usable torch device, else None."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"--device: {name!r} is not a torch device (try cpu or cuda)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: CUDA is not available on this machine"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {name}: MPS is not available on this machine"
    if device.type not in ("cpu", "cuda", "mps"):
        return f"--device {name}: unsupported device type {device.type!r}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``samkit`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    code = args.func(args)
    import torch.distributed as dist  # already imported by any command that could initialise it

    if dist.is_available() and dist.is_initialized():  # under torchrun, after a finished run
        from samkit.train.distributed import exit_without_teardown

        exit_without_teardown(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
