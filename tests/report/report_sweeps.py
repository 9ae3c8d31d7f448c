"""Small fake sweep directories for the report tests: sweep.json and run directories written
with samkit.rundir's writers and names (no training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from samkit.report.aggregate import (
    COMPLETED,
    HESSIAN_FILE,
    LAMBDA_MAX,
    LAMBDA_MAX_OVER_LAMBDA_5,
    STATUS,
    SWEEP_FILE,
    SWEEP_FORMAT,
)
from samkit.rundir import ANALYSIS_DIR, write_json, write_jsonl
from samkit.rundir import layout as keys


def write_run(
    run_dir: Path,
    test_error: float,
    *,
    status: str | None = COMPLETED,
    best: float | None = None,
    curve: list[tuple[int, float, float]] | None = None,
    train_seconds: float = 10.0,
    wall_seconds: float = 12.0,
    images_per_sec: float = 500.0,
    lambda_max: float | None = None,
    ratio: float | None = None,
) -> Path:
    """A run directory: metrics.jsonl from ``curve`` ((epoch, test error, train loss) per epoch;
    default two epochs ending at ``test_error`` and train loss 0.5) and, unless ``status`` is
    None, summary.json with that status; analysis/hessian.json with ``lambda_max``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    curve = curve or [(1, test_error + 0.1, 1.0), (2, test_error, 0.5)]
    write_jsonl(
        run_dir / keys.METRICS_FILE,
        [{keys.EPOCH: e, keys.TEST_ERROR_RATE: t, keys.TRAIN_LOSS: l} for e, t, l in curve],
    )
    if status is not None:
        write_json(
            run_dir / keys.SUMMARY_FILE,
            {
                STATUS: status,
                keys.FINAL_TEST_ERROR_RATE: test_error,
                keys.BEST_TEST_ERROR_RATE: best if best is not None else test_error,
                keys.TRAIN_SECONDS: train_seconds,
                keys.WALL_SECONDS: wall_seconds,
                keys.IMAGES_PER_SEC: images_per_sec,
            },
        )
    if lambda_max is not None:
        (run_dir / ANALYSIS_DIR).mkdir(exist_ok=True)
        write_json(
            run_dir / ANALYSIS_DIR / HESSIAN_FILE,
            {LAMBDA_MAX: lambda_max, LAMBDA_MAX_OVER_LAMBDA_5: ratio},
        )
    return run_dir


def entry(cell: str, seed: int, varying: dict[str, Any], **flags: Any) -> dict[str, Any]:
    """One sweep.json entry; its run directory is ``CELL/seed_SEED``."""
    return {
        "cell": cell,
        "variant": varying.get("variant"),
        "seed": seed,
        "flags": {**flags, **{k: v for k, v in varying.items() if k != "variant"}, "seed": seed},
        "varying": varying,
        "run_dir": f"{cell}/seed_{seed}",
    }


def write_sweep(
    sweep_dir: Path, entries: list[dict[str, Any]], report: dict[str, Any] | None = None
) -> Path:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"format": SWEEP_FORMAT, "name": "label_noise", "spec": {}, "cells": entries}
    if report is not None:
        manifest["report"] = report
    write_json(sweep_dir / SWEEP_FILE, manifest)
    return sweep_dir


# The label-noise sweep of the tests: variants sgd and sam at label noise 0.0 and 0.4, seeds 0-2.
SGD_04, SAM_04 = "sgd-label_noise=0.4", "sam-label_noise=0.4"
SGD_00, SAM_00 = "sgd-label_noise=0.0", "sam-label_noise=0.0"
SGD_04_ERRORS = [0.10, 0.12, 0.14]  # mean 0.12, std 0.02
SAM_04_ERRORS = [0.09, 0.10, 0.12]  # differences to sgd -0.01, -0.02, -0.02


def label_noise_sweep(sweep_dir: Path, report: dict[str, Any] | None = None) -> Path:
    """sgd/sam x label noise 0.0/0.4 x seeds 0, 1, 2, with:

    * sgd-label_noise=0.4: all three completed, test error 0.10 / 0.12 / 0.14, train seconds
      10 / 11 / 12, lambda_max 4 / 6 / 8;
    * sam-label_noise=0.4: all three completed, 0.09 / 0.10 / 0.12;
    * sgd-label_noise=0.0: seed 0 completed (0.05); seed 1 without summary.json (still running,
      0.01 in its metrics); seed 2 stopped by --max-steps (summary status "max_steps", 0.5);
    * sam-label_noise=0.0: seeds 0 and 1 completed (0.04, 0.06); seed 2 never started.
    """
    entries = []
    for variant in ("sgd", "sam"):
        for noise in (0.0, 0.4):
            cell = f"{variant}-label_noise={noise}"
            varying = {"variant": variant, "label_noise": noise}
            entries += [entry(cell, s, varying, optimizer=variant, num_epochs=2) for s in range(3)]
    write_sweep(sweep_dir, entries, report)
    for s, (a, b) in enumerate(zip(SGD_04_ERRORS, SAM_04_ERRORS)):
        write_run(
            sweep_dir / SGD_04 / f"seed_{s}",
            a,
            train_seconds=10.0 + s,
            lambda_max=4.0 + 2 * s,
            ratio=2.0,
        )
        write_run(sweep_dir / SAM_04 / f"seed_{s}", b, train_seconds=20.0)
    write_run(sweep_dir / SGD_00 / "seed_0", 0.05)
    write_run(sweep_dir / SGD_00 / "seed_1", 0.01, status=None)
    write_run(sweep_dir / SGD_00 / "seed_2", 0.5, status="max_steps")
    write_run(sweep_dir / SAM_00 / "seed_0", 0.04)
    write_run(sweep_dir / SAM_00 / "seed_1", 0.06)
    return sweep_dir
