"""``samkit compare`` reads what ``samkit train`` writes: the numbers of its table are the run's
own (the two once disagreed on a key name, and compare showed no images/s)."""

from __future__ import annotations

import json

import pytest

from samkit.cli import main
from samkit.rundir import read_metrics, read_summary


def test_compare_reads_a_real_training_run(fmnist_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data-dir", str(fmnist_dir), "--run-dir", str(run), "--epochs", "2",
            "--batch-size", "16", "--model-name", "resnet_tiny", "--threads", "1",
            "--no-tensorboard", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "report"
    assert main(["compare", str(run), "--output", str(out)]) == 0
    capsys.readouterr()
    (row,) = json.loads((out / "comparison.json").read_text())["rows"]
    summary, metrics = read_summary(run), read_metrics(run)
    assert row["final_test_error"] == summary["final_test_error_rate"]
    assert row["best_test_error"] == summary["best_test_error_rate"]
    assert row["time_sec"] == summary["wall_seconds"]
    assert row["images_per_sec"] == pytest.approx(summary["images_per_sec"])
    assert row["images_per_sec"] > 0 and len(metrics) == 2
    # every curve samkit train records is drawn
    assert sorted(p.name for p in out.glob("*.png")) == [
        "learning_rate.png",
        "test_error.png",
        "train_loss.png",
    ]


@pytest.mark.parametrize(
    "argv,label",
    [
        (["--optimizer", "gsam", "--gsam-alpha", "0.3"], "GSAM rho=0.05->0 alpha=0.3"),
        (["--optimizer", "wsam", "--no-wsam-decouple"], "WSAM rho=0.05 gamma=0.9 coupled"),
        (["--optimizer", "fsam", "--fsam-lambda", "0.6"], "F-SAM rho=0.05 sigma=1 lambda=0.6"),
    ],
)
def test_the_sam_family_trains_from_the_command_line(fmnist_dir, tmp_path, capsys, argv, label):
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(fmnist_dir), "--run-dir", str(run), "--epochs", "1",
                 "--batch-size", "16", "--model-name", "resnet_tiny", "--threads", "1",
                 "--no-tensorboard", "--no-progress", *argv]) == 0  # fmt: skip
    summary = read_summary(run)
    assert summary["optimizer"] == label and summary["skipped_steps"] == 0
    assert label in capsys.readouterr().out
