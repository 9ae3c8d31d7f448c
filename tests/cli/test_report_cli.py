"""``samkit report`` end to end on a small fake sweep directory: files written, tables printed,
bad input as one line ``samkit report: error: ...`` with exit status 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from samkit.cli.args import Parser
from samkit.cli.report import add_command
from samkit.report.aggregate import COMPLETED, STATUS, SWEEP_FILE, SWEEP_FORMAT
from samkit.rundir import layout as keys
from samkit.rundir import write_json, write_jsonl

# test error per seed: sgd 0.20 / 0.30, sam 0.15 / 0.27 -> differences -0.05, -0.03
ERRORS = {"sgd": [0.20, 0.30], "sam": [0.15, 0.27]}


def run_report(argv: list[str]) -> int:
    """``samkit report ARGV`` through a parser with only this command (cli/__init__ registers it
    in the real one)."""
    parser = Parser(prog="samkit")
    add_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", *argv])
    return args.func(args)


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    cells = []
    for variant, errors in ERRORS.items():
        for seed, error in enumerate(errors):
            run = sweep / variant / f"seed_{seed}"
            run.mkdir(parents=True)
            write_jsonl(
                run / keys.METRICS_FILE,
                [{keys.EPOCH: 1, keys.TEST_ERROR_RATE: error, keys.TRAIN_LOSS: 0.7}],
            )
            write_json(
                run / keys.SUMMARY_FILE,
                {
                    STATUS: COMPLETED,
                    keys.FINAL_TEST_ERROR_RATE: error,
                    keys.BEST_TEST_ERROR_RATE: error,
                    keys.TRAIN_SECONDS: 5.0,
                    keys.WALL_SECONDS: 6.0,
                    keys.IMAGES_PER_SEC: 100.0,
                },
            )
            cells.append(
                {
                    "cell": variant,
                    "variant": variant,
                    "seed": seed,
                    "flags": {"optimizer": variant, "seed": seed},
                    "varying": {"variant": variant},
                    "run_dir": f"{variant}/seed_{seed}",
                }
            )
    manifest = {"format": SWEEP_FORMAT, "name": "tiny", "spec": {}, "cells": cells}
    write_json(sweep / SWEEP_FILE, manifest)
    return sweep


def test_report_writes_files_and_prints_the_tables(sweep_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_report([str(sweep_dir), "--baseline", "sgd", "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    # sgd: mean 0.25, std 0.0707; two seeds: t_{0.975, 1} = tan(0.475 pi) = 12.706...
    half = math.tan(0.475 * math.pi) * math.sqrt(0.005) / math.sqrt(2) * 100
    assert f"| sgd | 2 | 25.00 ± {half:.2f} |" in stdout
    # sam - sgd = -0.05, -0.03: mean -4 pp, std sqrt(2) pp, half width 12.706 * sqrt(2)/sqrt(2)
    assert "Paired differences vs baseline 'sgd'" in stdout
    assert f"| sam | sgd | 2 | -4.00 ± {math.tan(0.475 * math.pi):.2f} |" in stdout
    for name in ("report.md", "report.json", "accuracy_vs_cost.png", "learning_curves.png"):
        assert (out / name).is_file()
        assert f"wrote {out / name}\n" in stdout
    report = json.loads((out / "report.json").read_text())
    (diff,) = report["differences"]
    assert diff["metrics"]["test_error"]["mean"] == pytest.approx(-0.04)
    # t = -0.04 / (sqrt(2) / 100 / sqrt(2)) = -4 with one degree of freedom:
    # two-sided p = 1 - 2 atan(4) / pi
    assert diff["metrics"]["test_error"]["p_value"] == pytest.approx(1 - 2 * math.atan(4) / math.pi)


def test_default_output_text_format_and_confidence(sweep_dir, capsys):
    assert run_report([str(sweep_dir), "--format", "text", "--confidence", "0.5"]) == 0
    stdout = capsys.readouterr().out
    assert (sweep_dir / "report" / "report.md").is_file()
    # 50%: t_{0.75, 1} = tan(pi / 4) = 1, half width = std / sqrt(2) = 0.05 -> 5.00 pp
    assert "25.00 ± 5.00" in stdout and "|" not in stdout.split("wrote")[0]
    assert "of the 50% t-interval" in stdout
    assert "Paired differences" not in stdout  # no baseline in sweep.json, none given


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    return captured.err


def test_unknown_baseline(sweep_dir, capsys):
    assert run_report([str(sweep_dir), "--baseline", "adam"]) == 2
    assert error_line(capsys).startswith(
        "samkit report: error: --baseline: unknown baseline 'adam': not a variant (sgd, sam)"
    )


def test_yardstick_prints_the_share_of_its_gain_and_an_unknown_one_is_named(sweep_dir, capsys):
    # sam's gain over sgd is the yardstick itself: share 1 on both seeds
    assert run_report([str(sweep_dir), "--baseline", "sgd", "--yardstick", "sam"]) == 0
    out = capsys.readouterr().out
    assert "Share of 'sam''s gain over the baseline, and cost:" in out
    assert run_report([str(sweep_dir), "--baseline", "sgd", "--yardstick", "adam"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("samkit report: error: --yardstick: unknown yardstick 'adam'")


def test_missing_directory_and_sweep_json(tmp_path, capsys):
    assert run_report([str(tmp_path / "nowhere")]) == 2
    assert error_line(capsys) == (
        f"samkit report: error: sweep directory not found: {tmp_path / 'nowhere'}\n"
    )
    assert run_report([str(tmp_path)]) == 2
    assert error_line(capsys).startswith(f"samkit report: error: {tmp_path / SWEEP_FILE}: no ")


def test_corrupt_sweep_json(sweep_dir, capsys):
    (sweep_dir / SWEEP_FILE).write_text('{"format": ')
    assert run_report([str(sweep_dir)]) == 2
    err = error_line(capsys)
    assert err.startswith(f"samkit report: error: {sweep_dir / SWEEP_FILE}: corrupt file")


def test_corrupt_run_file(sweep_dir, capsys):
    (sweep_dir / "sam" / "seed_1" / keys.METRICS_FILE).write_text("{oops\n")
    assert run_report([str(sweep_dir)]) == 2
    err = error_line(capsys)
    assert f"sam/seed_1/{keys.METRICS_FILE}:1: corrupt line" in err


@pytest.mark.parametrize("value", ["0", "1", "1.5", "nan", "x"])
def test_confidence_outside_the_open_unit_interval(sweep_dir, value, capsys):
    with pytest.raises(SystemExit) as exc:
        run_report([str(sweep_dir), "--confidence", value])
    assert exc.value.code == 2
    err = error_line(capsys)
    assert f"argument --confidence: '{value}' is not a number in (0, 1)" in err


def test_output_that_cannot_be_created(sweep_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run_report([str(sweep_dir), "--output", str(blocker / "sub")]) == 2
    assert error_line(capsys).startswith("samkit report: error: --output: cannot create")
