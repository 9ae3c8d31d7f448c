"""What every ``samkit`` command shares: the parser with one-line errors, the help format,
argument types built from value domains, boolean flags, the device check and the error style.

Errors, whatever the command: ``samkit COMMAND: error: MESSAGE`` on one line of stderr, exit
status 2 for bad input (1 when writing an output fails), never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from samkit.domains import Interval
from samkit.train.checks import device_problem

__all__ = [
    "PROG",
    "BoolFlag",
    "CommandError",
    "HelpFormatter",
    "Parser",
    "check_device",
    "fail",
    "number",
    "one_line",
    "parse_bool",
    "repeats_local_rank_zero",
    "warn",
]

PROG = "samkit"


class CommandError(Exception):
    """Bad input found while a command runs: printed by :func:`fail`, exit status ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def one_line(message: Any) -> str:
    """``message`` on one line: its lines joined by ``"; "`` (by a space after a colon)."""
    out = ""
    for part in str(message).splitlines():
        part = part.strip()
        if part:
            out += (" " if out.endswith(":") else "; " if out else "") + part
    return out


def fail(command: str, message: Any, code: int = 2) -> int:
    """Print ``samkit COMMAND: error: MESSAGE`` (one line) to stderr; return ``code``."""
    print(f"{PROG} {command}: error: {one_line(message)}", file=sys.stderr)
    return code


def warn(command: str, message: Any) -> None:
    print(f"{PROG} {command}: warning: {one_line(message)}", file=sys.stderr)


def repeats_local_rank_zero() -> bool:
    """True in a torchrun process other than its node's first (``LOCAL_RANK`` > 0 of a group).

    A usage error depends only on the command line and the node's files, so such a process would
    print local rank 0's message again (eight copies on an 8-GPU node); it exits silently instead.
    """
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ["LOCAL_RANK"]) > 0
    except (KeyError, ValueError):
        return False


class Parser(argparse.ArgumentParser):
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
        message = message.replace("\r", "\\r").replace("\n", "\\n")  # a word with a newline
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` unless the default is None or the help already names it, one
    option string per flag (aliases are named in the help text), and descriptions wrapped
    paragraph by paragraph (a blank line separates them)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
        return "\n\n".join(
            textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent)
            for p in paragraphs
        )

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            return super()._format_action_invocation(action)
        first = action.option_strings[0]
        if action.nargs == 0:
            return first
        if isinstance(action, BoolFlag):
            return f"{first} [BOOL]"
        default = self._get_default_metavar_for_optional(action)
        return f"{first} {self._format_args(action, default)}"


def number(kind: type, domain: Interval) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` if it lies in ``domain``, else "'x' is not <domain>"."""
    what = domain.describe(integer=kind is int)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or not domain.contains(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    parse.kind, parse.domain = kind, domain  # type: ignore[attr-defined]  # for the tests
    return parse


_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


class BoolFlag(argparse.Action):
    """``--flag`` / ``--flag true|false`` / ``--no-flag`` (and the seed's ``--noflag``)."""

    def __init__(self, option_strings, dest, default=None, help=None, negatives=()):
        self.negatives = tuple(negatives)
        super().__init__(
            list(option_strings) + list(self.negatives),
            dest,
            nargs="?",
            const=None,
            default=default,
            help=help,
            metavar="BOOL",
        )

    def __call__(self, parser, namespace, values, option_string=None):
        negative = option_string in self.negatives
        if values is None:
            value = not negative
        elif negative:
            raise argparse.ArgumentError(self, "takes no value")
        else:
            try:
                value = parse_bool(values)
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentError(self, str(exc)) from None
        setattr(namespace, self.dest, value)


def check_device(name: str) -> str | None:
    """An error message if ``name`` is not a usable torch device, else None."""
    return device_problem(name)
