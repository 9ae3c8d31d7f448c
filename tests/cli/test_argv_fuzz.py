"""Property-based fuzzing of the command-line parsers (issue 15, the bad-input suite): any list of
words, built from a command's own flags, numbers of every form and odd text, is either parsed or
refused with exit status 2 and one line on stderr. For ``samkit train`` the parsed flags also go
through the cross-flag checks (``config_from_args``), and for ``samkit sweep`` through the spec
built from ``--set`` / ``--grid``: those refuse with one line too, never a traceback. Nothing
runs: no training, no analysis."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from samkit.cli import build_parser
from samkit.cli.args import CommandError
from samkit.cli.sweep import build_spec
from samkit.cli.train import config_from_args
from samkit.sweep import SpecError
from samkit.train.config import settings as train_settings

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

PARSER = build_parser()  # one parser for every example: building it is most of the cost
SUBPARSERS = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices

NUMBERS = ["0", "1", "-1", "2", "16", "0.5", "1e-300", "1e300", "-1e300", "nan", "inf",
           "-inf", str(10**30), "1" + "0" * 400, "0x10", "1_000", " 7 ", "1e3", "4294967296",
           "65537"]  # fmt: skip
TEXT = ["", "abc", "true", "false", "none", "cpu", "cuda:7", "toaster", "sam", "esam", "sgd",
        "resnet_tiny", "wrn_28_10", "wrn_1000_1000", "wrn_27_10", "wrn_" + "9" * 5000, "basic",
        "cutout", "fashion_mnist", "/no/such/dir", "a\x00b", "é", "--", "-", "=",
        "x=1"]  # fmt: skip
SETTING_NAMES = [f.name for f in train_settings()] + ["colour", "run_seed", ""]


def flags(command: str) -> list[str]:
    out = []
    for action in SUBPARSERS[command]._actions:
        out += [s for s in action.option_strings if s not in ("-h", "--help")]
    return out


def words(command: str) -> st.SearchStrategy[list[str]]:
    flag = st.sampled_from(flags(command))
    word = flag | st.sampled_from(NUMBERS + TEXT) | st.text(max_size=6)
    joined = st.builds(lambda f, v: f"{f}={v}", flag, st.sampled_from(NUMBERS + TEXT))
    return st.lists(word | joined, max_size=8)


def parse(command: str, argv: list[str], capsys: pytest.CaptureFixture) -> argparse.Namespace:
    """The parsed namespace, or None after checking the refusal: status 2, one line."""
    capsys.readouterr()
    try:
        return PARSER.parse_args([command, *argv])
    except SystemExit as exc:
        err = capsys.readouterr().err
        assert exc.code == 2, (argv, exc.code, err)
        # unrecognized words are reported by the top-level parser: "samkit: error: ..."
        assert err.startswith((f"samkit {command}: error: ", "samkit: error: ")), (argv, err)
        assert err.count("\n") == 1, (argv, err)
        return None


def refused_in_one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text and "\n" not in text.strip() and "Traceback" not in text, text


@FUZZ
@given(argv=words("train"))
@example(argv=["--threads", "1" + "0" * 400])  # past float: the domain check overflowed
@example(argv=["--data-dir", "a\x00b"])
def test_train_words_parse_or_are_refused_in_one_line(argv, capsys):
    args = parse("train", argv, capsys)
    if args is None:
        return
    try:
        config_from_args(args)  # the cross-flag checks and what the machine must have
    except CommandError as exc:
        refused_in_one_line(exc)


OTHERS = ["evaluate", "hessian", "sharpness", "landscape", "compare", "report"]


@settings(FUZZ, max_examples=300)
@given(
    argv=st.sampled_from(OTHERS).flatmap(lambda c: st.tuples(st.just(c), words(c))),
    run=st.sampled_from([[], ["RUN"], ["RUN", "RUN2"]]),
)
@example(argv=("report", ["\n"]), run=["RUN"])  # a word with a newline, once printed on two lines
def test_other_commands_words_parse_or_are_refused_in_one_line(argv, run, capsys):
    command, rest = argv
    parse(command, [*run, *rest], capsys)


@FUZZ
@given(
    sets=st.lists(
        st.builds(
            lambda k, v: f"{k}={v}",
            st.sampled_from(SETTING_NAMES),
            st.sampled_from(NUMBERS + TEXT),
        )
        | st.sampled_from(TEXT),
        max_size=4,
    ),
    grid=st.lists(
        st.builds(
            lambda k, vs: f"{k}={','.join(vs)}",
            st.sampled_from(SETTING_NAMES),
            st.lists(st.sampled_from(NUMBERS + TEXT), max_size=3),
        ),
        max_size=2,
    ),
    seeds=st.none() | st.lists(st.sampled_from(NUMBERS), min_size=1, max_size=3),
)
@example(sets=["num_epochs=" + "1" + "0" * 400], grid=[], seeds=None)
def test_sweep_settings_parse_or_are_refused_in_one_line(sets, grid, seeds, capsys):
    argv = [w for s in sets for w in ("--set", s)] + [w for g in grid for w in ("--grid", g)]
    argv += ["--seeds", *seeds] if seeds else []
    args = parse("sweep", argv, capsys)
    if args is None:
        return
    try:
        build_spec(args).cells()  # each cell checked as samkit train would
    except (SpecError, CommandError) as exc:
        refused_in_one_line(exc)
