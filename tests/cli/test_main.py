"""The ``samkit`` command line, end to end on a tiny Fashion-MNIST written by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samkit.cli import main

# One thread: torch's OpenMP threads slow down many times over when another process is busy on
# the same cores; a single thread keeps these tests fast on a shared machine.
TINY = [
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--threads",
    "1",
    "--no-tensorboard",
    "--no-progress",
]


def run_dir(output: Path, lr="0.1", wd="0.0005", rho="0.05", seed=0) -> Path:
    return output / f"lr_{lr}" / f"wd_{wd}" / f"rho_{rho}" / f"seed_{seed}"


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: samkit" in err and "train" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("samkit ")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--epochs", "0"], "--epochs: '0' is not an integer in [1, 100000]"),
        (["--epochs", "two"], "--epochs: 'two' is not an integer in [1, 100000]"),
        (["--batch-size", "-1"], "--batch-size: '-1' is not an integer in [1, 65536]"),
        (["--learning-rate", "nan"], "--learning-rate: 'nan' is not a number in (0, 1000]"),
        (["--sam-rho", "-0.1"], "--sam-rho: '-0.1' is not a number in [0, 1000]"),
        (["--train-subset", "0"], "--train-subset: '0' is not an integer in [1, 1000000000]"),
        (["--threads", "0"], "--threads: '0' is not an integer in [1, 1024]"),
        (["--augment", "lots"], "--augment: invalid choice: 'lots'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_flags_exit_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1  # one line, no usage dump, no traceback
    assert err.startswith("samkit")


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_under_torchrun_usage_errors_are_printed_once_per_node(local_rank, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", local_rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    with pytest.raises(SystemExit) as info:  # found by the argument parser
        main(["train", "--frobnicate"])
    assert info.value.code == 2
    # found after parsing, from two flags together
    assert main(["train", "--optimizer", "sgd", "--sam-rho", "0.1"]) == 2
    err = capsys.readouterr().err
    if local_rank == "0":
        assert "unrecognized arguments: --frobnicate" in err
        assert "--sam-rho 0.1: has no effect with --optimizer sgd" in err
    else:  # the same messages would repeat local rank 0's
        assert err == ""


def test_unknown_model_and_device(fmnist_dir, tmp_path, capsys):
    assert main(["train", "--model", "nope", "--data-dir", str(fmnist_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("samkit train: error: --model-name: unknown model 'nope'")
    assert "resnet_small" in err
    assert main(["train", "--device", "toaster"]) == 2
    assert "is not a torch device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_missing_data_is_a_one_line_error(no_default_data, tmp_path, capsys):
    assert main(["train", *TINY, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("samkit train: error: Fashion-MNIST not found")
    for path in no_default_data:
        assert str(path) in err
    assert "apt-get install dataset-fashion-mnist" in err
    assert not (tmp_path / "out").exists()


def test_corrupt_data_is_a_one_line_error(fmnist_dir, tmp_path, capsys):
    path = fmnist_dir / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    argv = ["train", *TINY, "--data-dir", str(fmnist_dir), "--output-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "t10k-images-idx3-ubyte.gz" in err


@pytest.mark.parametrize("rho", ["0.05", "0"])
def test_train_end_to_end(fmnist_dir, tmp_path, rho, capsys):
    out = tmp_path / "runs"
    argv = ["train", *TINY, "--sam-rho", rho, "--data-dir", str(fmnist_dir)]
    assert main([*argv, "--output-dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "final test accuracy" in stdout
    directory = run_dir(out, rho=rho)
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["epochs_completed"] == 1
    assert summary["steps"] == 4  # 64 images, batches of 16
    assert summary["optimizer"] == ("SGD" if rho == "0" else "SAM rho=0.05")
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    assert summary["config"]["sam_rho"] == float(rho)
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["epoch"] == 1 and record["step"] == 4
    for key in ("train_loss", "train_error_rate", "test_loss", "test_error_rate", "gradient_norm"):
        assert isinstance(record[key], float)

    # Deterministic: the same seed gives the same numbers, another seed does not.
    assert main([*argv, "--output-dir", str(tmp_path / "again")]) == 0
    again = json.loads((run_dir(tmp_path / "again", rho=rho) / "summary.json").read_text())
    assert again["final_test_loss"] == summary["final_test_loss"]
    assert main([*argv, "--output-dir", str(tmp_path / "s1"), "--run-seed", "1"]) == 0
    other = json.loads((run_dir(tmp_path / "s1", rho=rho, seed=1) / "summary.json").read_text())
    assert other["final_test_loss"] != summary["final_test_loss"]


def test_train_subset_augment_and_tensorboard(fmnist_dir, tmp_path):
    argv = [
        "train",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--train-subset",
        "24",
        "--augment",
        "basic",
        "--no-progress",
        "--threads",
        "2",
        "--data-dir",
        str(fmnist_dir),
        "--output-dir",
        str(tmp_path),
    ]
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # restored after the run
    directory = run_dir(tmp_path)
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["epochs_completed"] == 2
    assert summary["num_threads"] == 2  # --threads, not the test session's one thread
    assert len((directory / "metrics.jsonl").read_text().splitlines()) == 2
    assert tensorboard_steps(directory)["test_error_rate"] == [3, 6]


def tensorboard_steps(directory: Path) -> dict[str, list[int]]:
    """tag -> steps logged, from the run's one TensorBoard event file."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (events,) = [p for p in directory.iterdir() if p.name.startswith("events.out.tfevents")]
    steps: dict[str, list[int]] = {}
    for event in EventFileLoader(str(events)).Load():
        for value in event.summary.value:
            steps.setdefault(value.tag, []).append(event.step)
    return steps


def test_tensorboard_keeps_the_scalars_logged_after_the_loop(fmnist_dir, tmp_path):
    # --max-steps stops mid-epoch: that partial epoch is evaluated and logged after the loop
    argv = ["train", *TINY, "--tensorboard", "--train-subset", "64", "--max-steps", "2"]
    assert main([*argv, "--data-dir", str(fmnist_dir), "--output-dir", str(tmp_path)]) == 0
    steps = tensorboard_steps(run_dir(tmp_path))
    assert steps["test_error_rate"] == [2] and steps["train_loss"] == [2]


def test_python_m_samkit_subprocess(fmnist_dir, tmp_path):
    env = {**os.environ, "SAMKIT_DATA": str(fmnist_dir)}
    bad = subprocess.run(
        [sys.executable, "-m", "samkit", "train", "--epochs", "-3"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2
    assert "--epochs: '-3' is not an integer in [1, 100000]" in bad.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "samkit", "train", *TINY, "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert (run_dir(tmp_path) / "summary.json").is_file()
