"""load_sweep, cells, missing runs, learning curves, the baseline rule and x flags."""

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

from samkit.report import (
    SWEEP_FILE,
    BaselineError,
    baseline_map,
    compare_to_baseline,
    learning_curves,
    load_sweep,
    numeric_flags,
    x_flags,
)
from samkit.rundir import RunDirError
from samkit.rundir import layout as keys

T_975_DF2 = 0.95 * math.sqrt(2 / (1 - 0.95**2))  # t_{0.975, 2} = 4.3026527297...


@pytest.fixture
def sweep(tmp_path):
    return load_sweep(label_noise_sweep(tmp_path / "sweep"))


def test_cells_are_grouped_by_name_in_manifest_order(sweep):
    assert sweep.name == "label_noise"
    assert [c.name for c in sweep.cells] == [SGD_00, SGD_04, SAM_00, SAM_04]
    cell = sweep.cell(SGD_04)
    assert cell.variant == "sgd" and cell.varying == {"variant": "sgd", "label_noise": 0.4}
    assert cell.seeds == [0, 1, 2] and "seed" not in cell.flags
    assert cell.flags["num_epochs"] == 2


def test_metrics_of_completed_runs(sweep):
    cell = sweep.cell(SGD_04)
    assert cell.values("test_error") == {0: 0.10, 1: 0.12, 2: 0.14}
    est = cell.estimate("test_error")
    assert est.mean == pytest.approx(0.12) and est.std == pytest.approx(0.02)
    assert est.half_width == pytest.approx(T_975_DF2 * 0.02 / math.sqrt(3))
    assert cell.values("train_loss") == {0: 0.5, 1: 0.5, 2: 0.5}  # the last record's
    assert cell.values("train_seconds") == {0: 10.0, 1: 11.0, 2: 12.0}
    assert cell.values("wall_seconds") == {0: 12.0, 1: 12.0, 2: 12.0}
    assert cell.values("images_per_sec") == {0: 500.0, 1: 500.0, 2: 500.0}
    assert cell.values("lambda_max") == {0: 4.0, 1: 6.0, 2: 8.0}
    assert cell.estimate("lambda_max").mean == pytest.approx(6.0)
    assert cell.values("lambda_max_over_lambda_5") == {0: 2.0, 1: 2.0, 2: 2.0}
    # no analysis/hessian.json: no lambda_max
    assert sweep.cell(SAM_04).values("lambda_max") == {}
    assert sweep.cell(SAM_04).estimate("lambda_max") is None


def test_unfinished_runs_are_missing_never_averaged(sweep):
    cell = sweep.cell(SGD_00)
    # seed 1 has no summary.json (error 0.01 in its metrics), seed 2 stopped by --max-steps (0.5)
    assert [r.seed for r in cell.completed] == [0]
    assert [(r.seed, r.status) for r in cell.missing] == [
        (1, f"no {keys.SUMMARY_FILE}"),
        (2, "status 'max_steps'"),
    ]
    assert cell.values("test_error") == {0: 0.05}
    est = cell.estimate("test_error")
    assert (est.n, est.mean, est.std, est.half_width) == (1, 0.05, None, None)
    assert learning_curves(cell)[keys.TEST_ERROR_RATE][-1].n == 1
    never_started = sweep.cell(SAM_00).missing
    assert [(r.seed, r.status) for r in never_started] == [(2, "no run directory")]


def test_learning_curves_mean_and_std_per_epoch(sweep):
    curves = learning_curves(sweep.cell(SGD_04))
    first, last = curves[keys.TEST_ERROR_RATE]
    assert (first.epoch, first.n, last.epoch) == (1, 3, 2)
    assert first.mean == pytest.approx(0.22) and first.std == pytest.approx(0.02)
    assert last.mean == pytest.approx(0.12)
    loss = curves[keys.TRAIN_LOSS]
    assert [(p.epoch, p.mean, p.std) for p in loss] == [(1, 1.0, 0.0), (2, 0.5, 0.0)]


def test_baseline_as_a_variant_matches_the_other_varying_values(sweep):
    assert baseline_map(sweep, "sgd") == {
        SGD_00: None,
        SGD_04: None,
        SAM_00: SGD_00,  # same label_noise, variant sgd
        SAM_04: SGD_04,
    }
    comparisons = {c.cell: c for c in compare_to_baseline(sweep, "sgd")}
    assert sorted(comparisons) == [SAM_00, SAM_04]  # the baseline cells are not compared
    d = comparisons[SAM_04].differences["test_error"]
    assert comparisons[SAM_04].baseline == SGD_04
    assert d.differences == pytest.approx({0: -0.01, 1: -0.02, 2: -0.02})
    assert d.mean == pytest.approx(-0.05 / 3)
    assert d.p_value == pytest.approx(1 - 5 / math.sqrt(27))
    # sam@0.0 has seeds 0, 1; sgd@0.0 only seed 0: one pair, no spread, no p-value
    d0 = comparisons[SAM_00].differences["test_error"]
    assert (d0.n_pairs, d0.mean, d0.std, d0.p_value) == (1, pytest.approx(-0.01), None, None)
    assert comparisons[SAM_04].differences["lambda_max"] is None  # sam has no hessian.json


def test_baseline_as_a_cell_is_every_cells_baseline(sweep):
    assert baseline_map(sweep, SGD_04) == {
        SGD_00: SGD_04,
        SGD_04: None,
        SAM_00: SGD_04,
        SAM_04: SGD_04,
    }
    cells = [c.cell for c in compare_to_baseline(sweep, SGD_04)]
    assert cells == [SGD_00, SAM_00, SAM_04]


def test_a_cell_without_its_baseline_counterpart(tmp_path):
    # esam at label noise 0.8, where no sgd cell exists: compared with nothing
    entries = [
        entry("sgd-0.4", 0, {"variant": "sgd", "label_noise": 0.4}),
        entry("esam-0.4", 0, {"variant": "esam", "label_noise": 0.4}),
        entry("esam-0.8", 0, {"variant": "esam", "label_noise": 0.8}),
    ]
    sweep = load_sweep(write_sweep(tmp_path / "s", entries))  # no run directories: all missing
    assert baseline_map(sweep, "sgd") == {"sgd-0.4": None, "esam-0.4": "sgd-0.4", "esam-0.8": None}
    comps = {c.cell: c for c in compare_to_baseline(sweep, "sgd")}
    assert comps["esam-0.8"].baseline is None
    assert comps["esam-0.4"].differences["test_error"] is None  # no completed run on either side


def test_unknown_baseline_names_the_variants_and_cells(sweep):
    with pytest.raises(BaselineError, match=r"unknown baseline 'adam': not a variant \(sgd, sam\)"):
        baseline_map(sweep, "adam")


def test_numeric_flags_and_report_x(tmp_path):
    entries = [
        entry(f"{v}-m{m}", 0, {"variant": v, "sam_m": m, "dataset": "cifar10", "rho": 0.05})
        for v in ("sam", "esam")
        for m in (1, 8, 128)
    ]
    sweep = load_sweep(write_sweep(tmp_path / "a", entries))
    assert numeric_flags(sweep) == ["sam_m"]  # dataset is a string, rho takes one value
    assert x_flags(sweep) == ["sam_m"]
    sweep = load_sweep(write_sweep(tmp_path / "b", entries, report={"x": ["dataset"]}))
    with pytest.raises(ValueError, match=rf"{SWEEP_FILE}: report.x names 'dataset'"):
        x_flags(sweep)
    # a sweep run on part of its grid: rho takes one value here, nothing to plot against it
    sweep = load_sweep(write_sweep(tmp_path / "c", entries, report={"x": ["rho", "sam_m"]}))
    assert x_flags(sweep) == ["sam_m"]


def test_sweep_errors_name_the_file(tmp_path):
    with pytest.raises(RunDirError, match="sweep directory not found"):
        load_sweep(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match=rf"empty/{SWEEP_FILE}: no {SWEEP_FILE}"):
        load_sweep(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / SWEEP_FILE).write_text('{"format": "samkit-sweep/1", "cells": [')
    with pytest.raises(RunDirError, match=rf"bad/{SWEEP_FILE}: corrupt file"):
        load_sweep(bad)
    (bad / SWEEP_FILE).write_text(json.dumps({"format": "other/1", "cells": []}))
    with pytest.raises(ValueError, match="format 'other/1'"):
        load_sweep(bad)
    twice = [entry("a", 0, {"variant": "sgd"}), entry("a", 0, {"variant": "sgd"})]
    with pytest.raises(ValueError, match=r"cells\[1\]: cell 'a' lists seed 0 twice"):
        load_sweep(write_sweep(tmp_path / "twice", twice))
    no_seed = [{**entry("a", 0, {"variant": "sgd"}), "seed": "zero"}]
    with pytest.raises(ValueError, match=r"cells\[0\]: 'seed' must be an integer"):
        load_sweep(write_sweep(tmp_path / "noseed", no_seed))


def test_a_corrupt_file_of_a_completed_run_is_named(tmp_path):
    sweep_dir = write_sweep(tmp_path / "s", [entry("a", 0, {"variant": "sgd"})])
    run = write_run(sweep_dir / "a" / "seed_0", 0.1)
    (run / keys.SUMMARY_FILE).write_text("{not json")
    with pytest.raises(RunDirError, match=rf"seed_0/{keys.SUMMARY_FILE}: corrupt"):
        load_sweep(sweep_dir)
