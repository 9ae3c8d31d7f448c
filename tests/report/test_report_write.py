"""build_report / write_report: the tables, report.json and the plots."""

from __future__ import annotations

import json
import math

import pytest
from report_sweeps import (
    SAM_00,
    SAM_04,
    SGD_00,
    SGD_04,
    entry,
    label_noise_sweep,
    write_run,
    write_sweep,
)

from samkit.report import build_report, cells_table, differences_table, load_sweep, write_report
from samkit.report.aggregate import YardstickError
from samkit.report.plots import log_x, plot_learning_curves
from samkit.report.tables import report_markdown
from samkit.rundir import layout as keys

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T_975_DF2 = 0.95 * math.sqrt(2 / (1 - 0.95**2))  # t_{0.975, 2} = 4.3026527297...


@pytest.fixture
def sweep_dir(tmp_path):
    return label_noise_sweep(tmp_path / "sweep", report={"baseline": "sgd"})


def test_report_dict_numbers(sweep_dir):
    report = build_report(load_sweep(sweep_dir))
    assert report["baseline"] == "sgd" and report["baseline_source"].endswith("report.baseline")
    assert report["x"] == ["label_noise"]
    cells = {c["cell"]: c for c in report["cells"]}
    sgd = cells[SGD_04]["metrics"]["test_error"]
    assert sgd["values"] == {"0": 0.10, "1": 0.12, "2": 0.14}
    assert sgd["estimate"]["half_width"] == pytest.approx(T_975_DF2 * 0.02 / math.sqrt(3))
    assert cells[SGD_00]["completed"] == [0]
    assert [m["seed"] for m in cells[SGD_00]["missing"]] == [1, 2]
    diffs = {d["cell"]: d for d in report["differences"]}
    assert set(diffs) == {SAM_00, SAM_04}
    d = diffs[SAM_04]["metrics"]["test_error"]
    assert d["differences"] == pytest.approx({"0": -0.01, "1": -0.02, "2": -0.02})
    assert d["p_value"] == pytest.approx(1 - 5 / math.sqrt(27))


def test_the_baseline_argument_overrides_the_manifest(sweep_dir):
    report = build_report(load_sweep(sweep_dir), baseline=SGD_00)
    assert report["baseline_source"] == "argument"
    assert [d["baseline"] for d in report["differences"]] == [SGD_00] * 3


def test_an_unknown_manifest_baseline_names_sweep_json(tmp_path):
    sweep_dir = label_noise_sweep(tmp_path / "s", report={"baseline": "adam"})
    with pytest.raises(ValueError, match=r"sweep.json: report.baseline: unknown baseline 'adam'"):
        build_report(load_sweep(sweep_dir))


def test_cells_table(sweep_dir):
    report = build_report(load_sweep(sweep_dir))
    half = T_975_DF2 * 0.02 / math.sqrt(3) * 100  # 4.97 percentage points
    lines = cells_table(report).splitlines()
    assert lines[0] == (
        "| cell | n | test error (%) | best test error (%) | train loss | images/s "
        "| wall time (s) | lambda_max | lambda_max/lambda_5 |"
    )
    assert lines[2] == f"| {SGD_00} | 1/3 | 5.00 | 5.00 | 0.5 | 500 | 12.0 | - | - |"
    assert lines[3] == (
        f"| {SGD_04} | 3 | 12.00 ± {half:.2f} | 12.00 ± {half:.2f} | 0.5 ± 0 | 500 ± 0 "
        f"| 12.0 ± 0.0 | 6 ± {T_975_DF2 * 2 / math.sqrt(3):.4g} | 2 ± 0 |"
    )
    text = cells_table(report, fmt="text").splitlines()
    assert text[0].startswith("cell ") and set(text[1]) <= {"-", " "}


def test_differences_table(sweep_dir):
    report = build_report(load_sweep(sweep_dir))
    std = 0.01 / math.sqrt(3)
    half = T_975_DF2 * std / math.sqrt(3) * 100
    mean = -5 / 3
    assert differences_table(report).splitlines()[2:] == [
        f"| {SAM_00} | {SGD_00} | 1 | -1.00 | - | - |",
        f"| {SAM_04} | {SGD_04} | 3 | {mean:+.2f} ± {half:.2f} "
        f"| [{mean - half:+.2f}, {mean + half:+.2f}] | {1 - 5 / math.sqrt(27):.3g} |",
    ]


def test_write_report_files(sweep_dir):
    report = write_report(sweep_dir)
    out = sweep_dir / "report"
    assert report["files"]["plots"] == [
        "test_error_vs_label_noise.png",
        "accuracy_vs_cost.png",
        "learning_curves.png",
    ]
    for name in report["files"]["plots"]:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    assert json.loads((out / "report.json").read_text()) == report  # every number, as JSON
    md = (out / "report.md").read_text()
    assert md.startswith("# Sweep report: label_noise")
    assert "## Paired differences vs baseline `sgd`" in md
    assert f"- `{SGD_00}` seed 2: status 'max_steps'" in md
    assert "![learning_curves.png](learning_curves.png)" in md
    # a report written again without plots removes the PNGs of the previous one
    write_report(sweep_dir, plot=False)
    assert not list(out.glob("*.png"))


def test_learning_curves_split_above_eight_cells(tmp_path):
    entries = [entry(f"c{i}", 0, {"variant": "sgd", "lr": 0.01 * (i + 1)}) for i in range(9)]
    sweep_dir = write_sweep(tmp_path / "s", entries)
    for i in range(9):
        write_run(sweep_dir / f"c{i}" / "seed_0", 0.1 + 0.01 * i)
    report = build_report(load_sweep(sweep_dir))
    assert report["cells"][0]["curves"][keys.TEST_ERROR_RATE][0]["std"] is None  # one seed
    paths = plot_learning_curves(report, tmp_path)
    assert [p.name for p in paths] == ["learning_curves_1.png", "learning_curves_2.png"]


def test_log_x_when_the_values_span_more_than_ten_times():
    assert log_x([1, 2, 4, 16, 128])
    assert not log_x([0.0, 0.2, 0.4])  # zero: linear
    assert not log_x([1, 10])  # exactly 10x: linear


def family_sweep(sweep_dir, report=None):
    """sgd, sam, cheap (a SAM variant), 3 seeds each; test errors chosen so that the shares of
    SAM's gain are easy by hand, and one seed where SAM does not beat SGD."""
    errors = {
        "sgd": [0.30, 0.30, 0.20],
        "sam": [0.20, 0.25, 0.25],  # gains 0.10, 0.05, and none on seed 2
        "cheap": [0.25, 0.27, 0.10],  # shares 0.5, 0.6 (seed 2 left out)
    }
    seconds = {"sgd": 10.0, "sam": 20.0, "cheap": 12.0}
    entries = [
        entry(cell, s, {"variant": cell}, optimizer=cell) for cell in errors for s in range(3)
    ]
    write_sweep(sweep_dir, entries, report)
    for cell, errs in errors.items():
        for s, e in enumerate(errs):
            write_run(sweep_dir / cell / f"seed_{s}", e, train_seconds=seconds[cell] + s)
    return sweep_dir


def test_share_of_the_yardsticks_gain_by_hand(tmp_path):
    sweep_dir = family_sweep(tmp_path / "s", report={"baseline": "sgd", "yardstick": "sam"})
    report = build_report(load_sweep(sweep_dir))
    assert report["yardstick"] == "sam"
    gains = {g["cell"]: g for g in report["gains"]}
    assert set(gains) == {"sam", "cheap"}  # every cell with a baseline, the yardstick too
    cheap = gains["cheap"]
    assert cheap["left_out_seeds"] == ["2"]
    share = cheap["share_of_gain"]
    assert share["mean"] == pytest.approx(0.55) and share["n"] == 2
    # t_{0.975, 1} = 12.706...: half-width 12.706 * std / sqrt(2), std = 0.1 / sqrt(2)
    assert share["half_width"] == pytest.approx(12.7062047362 * 0.05, rel=1e-6)
    assert gains["sam"]["share_of_gain"]["mean"] == pytest.approx(1.0)
    # time: 12/10, 13/11, 14/12
    assert cheap["time_ratio"]["mean"] == pytest.approx((1.2 + 13 / 11 + 14 / 12) / 3)
    text = report_markdown(report)
    assert "## Share of `sam`'s gain, and cost" in text
    assert "0.55 ± 0.64 (seeds 2 left out: no gain)" in text


def test_no_yardstick_no_gains_and_an_unknown_one_is_named(tmp_path):
    sweep_dir = family_sweep(tmp_path / "s", report={"baseline": "sgd"})
    assert build_report(load_sweep(sweep_dir))["gains"] == []
    with pytest.raises(YardstickError, match="unknown yardstick 'adam'"):
        build_report(load_sweep(sweep_dir), yardstick="adam")
    bad = family_sweep(tmp_path / "b", report={"baseline": "sgd", "yardstick": "adam"})
    with pytest.raises(ValueError, match=r"sweep.json: report.yardstick: unknown yardstick"):
        build_report(load_sweep(bad))
