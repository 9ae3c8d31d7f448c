"""Checkpoints are trusted only as far as they deserve (issue 15, items 1, 3 and 6): resume checks
the settings embedded in the checkpoint, a malformed-but-checksummed checkpoint is passed over for
the one before it and set aside, rotation never deletes the last good checkpoint, nothing
non-finite is ever checkpointed, and ``samkit evaluate`` refuses non-finite weights."""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from train_helpers import assert_same_weights

from samkit.cli import main
from samkit.rundir import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from samkit.train.errors import TrainingDivergedError
from samkit.train.run import MAX_SKIPPED_IN_A_ROW, save, step_done

FAST = ["--model-name", "resnet_tiny", "--batch-size", "16", "--epochs", "1", "--threads", "1",
        "--no-tensorboard", "--no-progress"]  # fmt: skip


def _train(fmnist_dir: Path, run: Path, *extra: str) -> int:
    return main(["train", *FAST, "--data-dir", str(fmnist_dir), "--run-dir", str(run), *extra])


def _all_finite(path: Path) -> bool:
    saved = load_checkpoint(path)
    tensors = [t for t in saved["model"].values() if t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_resume_refuses_a_checkpoint_whose_settings_differ_from_an_edited_config_json(
    fmnist_dir, tmp_path, capsys
):
    run = tmp_path / "run"
    assert _train(fmnist_dir, run, "--max-steps", "2") == 0
    config = json.loads((run / "config.json").read_text())
    config["sam_rho"] = 0.5  # edited by hand: config.json now agrees with the new command
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()

    assert _train(fmnist_dir, run, "--max-steps", "4", "--sam-rho", "0.5") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    newest = list_checkpoints(run / "checkpoints")[0]
    assert newest.name in err and "--sam-rho 0.05 -> 0.5" in err and "--no-resume" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["sam_rho"] == 0.05  # the rho-0.05 run is not relabelled


def test_a_malformed_but_checksummed_checkpoint_falls_back_to_the_previous_one(
    fmnist_dir, tmp_path, capsys
):
    reference = tmp_path / "reference"
    assert _train(fmnist_dir, reference, "--max-steps", "4") == 0

    run = tmp_path / "run"
    assert _train(fmnist_dir, run, "--max-steps", "2", "--save-progress-seconds", "0") == 0
    good = list_checkpoints(run / "checkpoints")[0]
    saved = load_checkpoint(good)
    saved.pop("format")
    del saved["optimizer"]["state"]  # a field missing, in a file whose checksum is right
    malformed = save_checkpoint(saved, run / "checkpoints", step=3, keep=10)
    capsys.readouterr()

    with pytest.warns(RuntimeWarning, match="skipping unusable checkpoint") as warned:
        assert _train(fmnist_dir, run, "--max-steps", "4") == 0
    message = " ".join(str(w.message) for w in warned)
    assert malformed.name in message and "malformed" in message and good.name in message
    out = capsys.readouterr().out
    assert f"resuming from {good.name}" in out
    # set aside, never loaded or rotated again; the run continued exactly from the good one
    assert not malformed.exists() and malformed.with_name(malformed.name + ".bad").exists()
    assert malformed not in list_checkpoints(run / "checkpoints")
    newest = load_checkpoint(list_checkpoints(run / "checkpoints")[0])
    expected = load_checkpoint(list_checkpoints(reference / "checkpoints")[0])
    assert newest["global_step"] == expected["global_step"] == 4
    assert_same_weights(newest["model"], expected["model"])


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_good_one_is_never_rotated_out(
    fmnist_dir, tmp_path, capsys
):
    run = tmp_path / "run"
    assert _train(fmnist_dir, run, "--max-steps", "3", "--save-progress-seconds", "0") == 0
    newest, good = list_checkpoints(run / "checkpoints")[:2]
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    newest.write_bytes(bytes(raw))

    with pytest.warns(RuntimeWarning, match="checksum"):
        assert _train(fmnist_dir, run, "--max-steps", "4", "--save-progress-seconds", "0") == 0
    names = [p.name for p in list_checkpoints(run / "checkpoints")]
    assert newest.name not in names  # the corrupt one no longer counts among the kept two
    assert (run / "checkpoints" / (newest.name + ".bad")).exists()
    assert all(_all_finite(p) for p in list_checkpoints(run / "checkpoints"))
    assert len(names) == 2 and names[0].startswith("ckpt-000000004-")


def test_rotation_keeps_a_protected_checkpoint(tmp_path):
    paths = [save_checkpoint({"x": torch.tensor(i)}, tmp_path, step=i, keep=2) for i in range(3)]
    assert list_checkpoints(tmp_path) == [paths[2], paths[1]]
    later = [
        save_checkpoint({"x": torch.tensor(i)}, tmp_path, step=i, keep=2, protect=[paths[1]])
        for i in (3, 4)
    ]
    assert list_checkpoints(tmp_path) == [later[1], later[0], paths[1]]


def test_nothing_non_finite_is_checkpointed_and_divergence_names_the_last_good_checkpoint(
    fmnist_dir, tmp_path, capsys
):
    run = tmp_path / "run"
    argv = ["--learning-rate", "1000", "--save-progress-seconds", "0", "--epochs", "2"]
    assert _train(fmnist_dir, run, *argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "training diverged at step" in err
    kept = list_checkpoints(run / "checkpoints")
    assert kept and all(_all_finite(p) for p in kept)
    assert not (run / "summary.json").exists()
    # the checkpoint it names as the last that still trained is one that was kept
    assert "still trained" in err and any(str(p) in err for p in kept)


def test_non_finite_weights_are_never_written_over_a_good_checkpoint(tmp_path):
    good = save_checkpoint({"x": torch.tensor(1.0)}, tmp_path / "checkpoints", step=1)
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = math.inf
    run = SimpleNamespace(model=model, ema=None, last_good=good, is_main=True, run_dir=tmp_path)
    with pytest.raises(TrainingDivergedError, match="not finite") as info:
        save(run, SimpleNamespace(global_step=2))
    assert str(good) in str(info.value)
    assert list_checkpoints(tmp_path / "checkpoints") == [good]


def test_many_skipped_steps_in_a_row_end_the_run_naming_the_last_good_checkpoint(tmp_path):
    good = tmp_path / "ckpt-000000007-0123456789abcdef.pt"
    run = SimpleNamespace(candidate=good, last_good=None, skipped_in_row=0)
    state = SimpleNamespace(global_step=8)
    step_done(run, state, True)
    assert run.last_good == good and run.candidate is None
    for _ in range(MAX_SKIPPED_IN_A_ROW - 1):
        step_done(run, state, False)
    step_done(run, state, True)  # one taken step resets the count
    for _ in range(MAX_SKIPPED_IN_A_ROW - 1):
        step_done(run, state, False)
    with pytest.raises(TrainingDivergedError, match=f"last {MAX_SKIPPED_IN_A_ROW} steps") as info:
        step_done(run, state, False)
    assert str(good) in str(info.value)


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_evaluate_refuses_non_finite_weights(fmnist_dir, tmp_path, capsys, value):
    run = tmp_path / "run"
    assert _train(fmnist_dir, run, "--max-steps", "2") == 0
    saved = load_checkpoint(list_checkpoints(run / "checkpoints")[0])
    saved.pop("format")
    name = next(k for k, v in saved["model"].items() if v.is_floating_point())
    saved["model"][name].view(-1)[0] = value
    bad = save_checkpoint(saved, run / "checkpoints", step=99, keep=10)
    capsys.readouterr()

    assert main(["evaluate", str(run), "--data-dir", str(fmnist_dir)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert bad.name in captured.err and "not finite" in captured.err


class _Payload:
    """Unpickling this would run code (create a file): ``weights_only=True`` must refuse it."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"format": "samkit-checkpoint/1", "model": _Payload(target)}, buffer)
    data = buffer.getvalue()
    path = tmp_path / f"ckpt-000000001-{hashlib.sha256(data).hexdigest()[:16]}.pt"
    path.write_bytes(data)  # its checksum is right: only weights_only stands in the way
    with pytest.raises(CheckpointError, match="unsafe"):
        load_checkpoint(path)
    assert not target.exists()
