"""``samkit train``'s flags are derived from ``TrainConfig``, and docs/train.md's flag tables
list exactly the parser's flags, with their seed spellings and aliases."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from samkit.cli import build_parser
from samkit.cli.train import config_from_args, train_flags
from samkit.optim import get_optimizer_info
from samkit.train.config import RESUME_IGNORED, SEED_DEFAULTS, TrainConfig, settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "train.md"


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def parser_flags() -> dict[str, set[str]]:
    """Primary flag -> every option string of it (aliases, seed spelling, negatives)."""
    return {
        a.option_strings[0]: set(a.option_strings)
        for a in train_parser()._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction)
    }


def doc_rows() -> list[tuple[list[str], str]]:
    """The rows of the tables under '## Flags': (flags named in the first cell, seed cell)."""
    text = DOC.read_text()
    section = text.split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`--"):
            continue
        flags = [m.split()[0] for m in re.findall(r"`(--[^`]+)`", cells[0])]
        rows.append((flags, cells[1].strip("`")))
    return rows


def test_the_doc_tables_are_found():
    rows = doc_rows()
    assert len(rows) > 40 and rows[0][0][0] == "--dataset"


def test_every_flag_is_documented_once_and_nothing_else_is():
    flags = parser_flags()
    documented = [row[0][0] for row in doc_rows()]
    assert sorted(documented) == sorted(flags)


@pytest.mark.parametrize(
    "field", [f for f in settings() if f.setting.is_flag], ids=lambda f: f.name
)
def test_each_doc_row_names_the_seed_spelling_and_aliases(field):
    names, negatives = train_flags(field)
    (row,) = [r for r in doc_rows() if r[0][0] == field.flag]
    documented, seed_cell = row
    assert seed_cell == (field.setting.seed or "")
    # `--x` (also `--y`) and, for booleans, `--no-x`: all of them are real option strings
    assert set(documented) <= set(names) | set(negatives) | {field.setting.seed}
    assert set(field.setting.aliases) <= set(documented)


def test_the_parser_is_the_config():
    # Every field that is a flag becomes one, under its kebab-case name, and the parsed
    # defaults give TrainConfig's defaults.
    flags = parser_flags()
    for field in settings():
        assert (field.flag in flags) == field.setting.is_flag, field.name
    args = train_parser().parse_args([])
    assert config_from_args(args) == TrainConfig()


def test_seed_spellings_reach_the_config():
    args = train_parser().parse_args(
        ["--sam_rho", "0.1", "--num_epochs", "3", "--use_test_set", "false", "--nouse_test_set"]
    )
    cfg = config_from_args(args)
    assert (cfg.sam_rho, cfg.num_epochs, cfg.use_test_set) == (0.1, 3, False)


def test_optimizer_options_come_from_the_registry():
    fields = {f.name: f for f in settings()}
    options = [o for n in ("esam", "looksam", "aesam", "rst", "late_sam")
               for o in get_optimizer_info(n).options]  # fmt: skip
    for option in options:
        field = fields[option.flag]
        assert field.default == option.default
        if option.flag != "run_seed":  # the run's seed, shared with everything else
            assert field.setting.help == option.help
            assert field.setting.domain == option.domain
            assert field.setting.choices == option.choices
            assert field.optional == option.optional
    assert train_parser()._option_string_actions["--optimizer"].choices == (
        "sgd", "sam", "esam", "gsam", "wsam", "fsam", "sam_on", "looksam", "aesam", "rst",
        "late_sam", "msam", "saf", "mesa",
    )  # fmt: skip


def test_seed_defaults_and_resume_ignored_are_derived():
    assert SEED_DEFAULTS == {
        "dataset": "cifar10",
        "model_name": "WideResnet28x10",
        "num_epochs": 200,
        "weight_decay": 0.001,
        "weight_decay_mode": "loss",
        "gradient_clipping": 5.0,
        "sam_rho": 0.0,
        "image_level_augmentations": "basic",
        "amp": "none",
    }
    assert "sam_rho" not in RESUME_IGNORED and "threads" in RESUME_IGNORED
    assert {f.name for f in dataclasses.fields(TrainConfig)} >= RESUME_IGNORED
