"""What a resume must refuse, executed: a checkpoint written for another number of steps per epoch
(the data changed under the run) or by another number of processes (torchrun's world size; the
perturbations, m = per-process batch, would change). The refused run is left as it was. (The
messages are matched on stable words only: "steps per epoch", "processes".)"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from train_helpers import FAST

from data_formats import write_fashion_mnist
from samkit.cli import main
from samkit.rundir import list_checkpoints, load_checkpoint, save_checkpoint


def train(data_dir: Path, run: Path, *extra: str) -> int:
    argv = ["train", *FAST, "--model-name", "resnet_tiny", "--batch-size", "8"]
    argv += ["--num-epochs", "2", "--no-tensorboard", "--data-dir", str(data_dir)]
    return main([*argv, "--run-dir", str(run), *extra])


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of the run directory but its lock, by relative path."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_resume_refuses_a_checkpoint_written_for_another_number_of_steps_per_epoch(
    tmp_path, capsys
):
    data, run = tmp_path / "fm", tmp_path / "run"
    write_fashion_mnist(data, n_train=64, n_test=16, seed=1)  # 8 steps per epoch
    assert train(data, run, "--max-steps", "3") == 0
    before = snapshot(run)
    write_fashion_mnist(data, n_train=96, n_test=16, seed=1)  # the data changed: 12 steps
    capsys.readouterr()
    assert train(data, run) != 0
    err = capsys.readouterr().err
    assert "steps per epoch" in err and "8" in err and "12" in err, err
    assert "Traceback" not in err
    assert snapshot(run) == before  # nothing resumed, rotated, set aside or rewritten


def test_resume_refuses_a_checkpoint_written_by_another_number_of_processes(tmp_path, capsys):
    data, run = tmp_path / "fm", tmp_path / "run"
    write_fashion_mnist(data, n_train=64, n_test=16, seed=1)
    assert train(data, run, "--max-steps", "3") == 0
    # As torchrun with 2 processes would have written it (the only difference in the file)
    newest = list_checkpoints(run / "checkpoints")[0]
    saved = load_checkpoint(newest)
    assert saved["world_size"] == 1
    saved.pop("format")
    saved["world_size"] = 2
    newest.unlink()
    rewritten = save_checkpoint(saved, run / "checkpoints", saved["global_step"])
    assert load_checkpoint(rewritten)["world_size"] == 2
    before = snapshot(run)
    capsys.readouterr()
    assert train(data, run) != 0
    err = capsys.readouterr().err
    assert "processes" in err and "2" in err, err
    assert "Traceback" not in err
    assert snapshot(run) == before
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3  # the earlier run's summary, untouched


def test_the_same_checkpoint_resumes_when_nothing_changed(tmp_path):
    # The control: the refusals above come from the change, not from resuming itself.
    data, run = tmp_path / "fm", tmp_path / "run"
    write_fashion_mnist(data, n_train=64, n_test=16, seed=1)
    assert train(data, run, "--max-steps", "3") == 0
    assert train(data, run) == 0
    saved = load_checkpoint(list_checkpoints(run / "checkpoints")[0])
    assert saved["global_step"] == 16 and isinstance(saved["model"], dict)
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
