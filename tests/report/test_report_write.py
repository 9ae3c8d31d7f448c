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


def family_sweep(sweep_dir, report=None, noisy_sam=False):
    """sgd, sam, cheap (a SAM variant), 3 seeds each. SAM gains 0.10, 0.06, 0.08 over SGD and
    cheap 0.05, 0.03, 0.05: a share of 13/24. ``noisy_sam``: SAM's gains 0.10, 0.05, -0.10 (not
    significant: Fieller's interval is unbounded)."""
    sam = [0.20, 0.20, 0.25] if noisy_sam else [0.20, 0.19, 0.12]
    errors = {"sgd": [0.30, 0.25, 0.15] if noisy_sam else [0.30, 0.25, 0.20], "sam": sam}
    errors["cheap"] = [0.25, 0.22, 0.15]
    seconds = {"sgd": 10.0, "sam": 20.0, "cheap": 12.0}
    entries = [
        entry(cell, s, {"variant": cell}, optimizer=cell) for cell in errors for s in range(3)
    ]
    write_sweep(sweep_dir, entries, report)
    for cell, errs in errors.items():
        for s, e in enumerate(errs):
            write_run(sweep_dir / cell / f"seed_{s}", e, train_seconds=seconds[cell] + s)
    return sweep_dir


def fieller_by_scan(num, den, confidence=0.95):
    """The set {theta: (mean(num) - theta mean(den))^2 <= t^2/n var(num - theta den)} on a fine
    grid: its smallest and largest members (None if it reaches the grid's ends)."""
    from scipy import stats

    n = len(num)
    t2 = stats.t.ppf((1 + confidence) / 2, n - 1) ** 2
    inside = []
    for k in range(-40000, 40001):
        theta = k / 10000
        d = [a - theta * b for a, b in zip(num, den)]
        m = sum(d) / n
        var = sum((x - m) ** 2 for x in d) / (n - 1)
        if m * m <= t2 / n * var:
            inside.append(theta)
    if not inside or inside[0] == -4 or inside[-1] == 4:
        return None
    return inside[0], inside[-1]


def test_share_of_the_yardsticks_gain_by_hand(tmp_path):
    sweep_dir = family_sweep(tmp_path / "s", report={"baseline": "sgd", "yardstick": "sam"})
    report = build_report(load_sweep(sweep_dir))
    assert report["yardstick"] == "sam"
    gains = {g["cell"]: g for g in report["gains"]}
    assert set(gains) == {"sam", "cheap"}  # every cell with a baseline, the yardstick too
    share = gains["cheap"]["share_of_gain"]
    assert share["mean"] == pytest.approx(0.13 / 0.24) and share["n"] == 3
    low, high = fieller_by_scan([0.05, 0.03, 0.05], [0.10, 0.06, 0.08])
    assert share["ci_low"] == pytest.approx(low, abs=2e-4)
    assert share["ci_high"] == pytest.approx(high, abs=2e-4)
    assert gains["sam"]["share_of_gain"]["mean"] == pytest.approx(1.0)
    # time: 12/10, 13/11, 14/12
    assert gains["cheap"]["time_ratio"]["mean"] == pytest.approx((1.2 + 13 / 11 + 14 / 12) / 3)
    text = report_markdown(report)
    assert "## Share of `sam`'s gain, and cost" in text
    assert f"| 0.54 | [{low:.2f}, {high:.2f}] |" in text


def test_a_yardstick_without_a_significant_gain_gives_an_unbounded_interval(tmp_path):
    sweep_dir = family_sweep(
        tmp_path / "s", report={"baseline": "sgd", "yardstick": "sam"}, noisy_sam=True
    )
    report = build_report(load_sweep(sweep_dir))
    share = {g["cell"]: g for g in report["gains"]}["cheap"]["share_of_gain"]
    assert share["ci_low"] is None and share["ci_high"] is None
    assert fieller_by_scan([0.05, 0.03, 0.0], [0.10, 0.05, -0.10]) is None
    assert "| unbounded |" in report_markdown(report)


def test_no_yardstick_no_gains_and_an_unknown_one_is_named(tmp_path):
    sweep_dir = family_sweep(tmp_path / "s", report={"baseline": "sgd"})
    assert build_report(load_sweep(sweep_dir))["gains"] == []
    with pytest.raises(YardstickError, match="unknown yardstick 'adam'"):
        build_report(load_sweep(sweep_dir), yardstick="adam")
    bad = family_sweep(tmp_path / "b", report={"baseline": "sgd", "yardstick": "adam"})
    with pytest.raises(ValueError, match=r"sweep.json: report.yardstick: unknown yardstick"):
        build_report(load_sweep(bad))


def test_runs_evaluated_on_the_holdout_are_said_so(sweep_dir):
    report = build_report(load_sweep(sweep_dir))
    assert report["eval_splits"] == ["test"] and "holdout" not in report_markdown(report)
    summaries = list(sweep_dir.glob(f"*/seed_*/{keys.SUMMARY_FILE}"))
    assert summaries
    for path in summaries:  # every run evaluated on the holdout
        path.write_text(json.dumps({**json.loads(path.read_text()), "eval_split": "holdout"}))
    report = build_report(load_sweep(sweep_dir))
    assert report["eval_splits"] == ["holdout"]
    assert "every test error below is a holdout error." in report_markdown(report)
