"""Nothing lost, nothing silently wrong (issue 15): one writer per run directory, foreign
directories never written into, m-sharpness chunks that fit the batch, and a run whose every step
was skipped does not end as completed."""

from __future__ import annotations

import math
import os

import pytest

from samkit.cli import main
from samkit.rundir import RunDirLock
from samkit.train import build

FAST = ["--model-name", "resnet_tiny", "--batch-size", "16", "--epochs", "1", "--threads", "1",
        "--no-tensorboard", "--no-progress"]  # fmt: skip


def test_a_second_writer_is_refused_with_the_holders_pid(fmnist_dir, tmp_path, capsys):
    run = tmp_path / "run"
    with RunDirLock(run):  # as a running samkit train holds it
        code = main(["train", *FAST, "--data-dir", str(fmnist_dir), "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"is in use by another samkit train (PID {os.getpid()})" in err
    assert not (run / "config.json").exists()
    # released: the same command now runs
    assert main(["train", *FAST, "--data-dir", str(fmnist_dir), "--run-dir", str(run)]) == 0


def test_a_directory_that_is_not_a_samkit_run_is_never_written_into(fmnist_dir, tmp_path, capsys):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("precious")
    assert main(["train", *FAST, "--data-dir", str(fmnist_dir), "--run-dir", str(run)]) == 2
    assert "not a samkit run directory" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert (run / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("m", ["32", "6"])
def test_sam_m_must_divide_the_batch(fmnist_dir, tmp_path, capsys, m):
    argv = ["train", *FAST, "--data-dir", str(fmnist_dir), "--run-dir", str(tmp_path / "r")]
    assert main([*argv, "--sam-m", m]) == 2
    assert f"--sam-m {m}: must divide --batch-size 16 into equal chunks" in capsys.readouterr().err


def test_a_run_whose_every_step_was_skipped_fails(fmnist_dir, tmp_path, capsys, monkeypatch):
    # A loss that is never finite: every step is skipped. (--sam-rho 1e30 did it once; rho is
    # now at most 1000, which keeps the perturbation representable in float32.)
    build_loss = build.build_loss
    monkeypatch.setattr(
        build, "build_loss", lambda cfg, params: lambda *a: build_loss(cfg, params)(*a) * math.inf
    )
    run = tmp_path / "r"
    argv = ["train", *FAST, "--data-dir", str(fmnist_dir), "--run-dir", str(run),
            "--max-steps", "3"]  # fmt: skip
    with pytest.warns(RuntimeWarning):
        assert main(argv) == 1
    assert "every one of the 3 steps was skipped" in capsys.readouterr().err
    assert not (run / "summary.json").exists()
