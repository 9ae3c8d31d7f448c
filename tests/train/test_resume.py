"""Crash safety of ``samkit train``, with real processes: SIGKILL at any moment loses at most the
work since the last checkpoint and the resumed run ends with exactly the weights (and metrics) of
an uninterrupted one; a corrupt latest checkpoint falls back to the previous one; SIGINT and
SIGTERM save a checkpoint and exit with 130 / 143.

The signals arrive at known steps, sent by the run itself from a test hook (``--signal-at``,
``--signal-in-eval``, see tests/samkit_entry.py): no test depends on how fast the machine is."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import FAST, assert_same_weights, read_metrics

from samkit.rundir import list_checkpoints, load_latest_checkpoint

STEPS_PER_EPOCH = 16  # 128 images, batches of 8
TIMING = {"epoch_seconds", "images_per_sec", "wall_seconds"}


ENTRY = Path(__file__).resolve().parents[1] / "samkit_entry.py"  # samkit + test hooks


def command(data, run_dir: Path, *extra: str, hooks: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        str(ENTRY),
        *hooks,
        "train",
        *FAST,
        "--data-dir",
        str(data.dirs["fashion_mnist"]),
        "--model-name",
        "resnet_tiny",
        "--num-epochs",
        "2",
        "--batch-size",
        "8",
        "--image-level-augmentations",
        "basic",
        "--batch-level-augmentations",
        "cutout",
        "--ema-decay",
        "0.9",
        "--optimizer",
        "esam",  # its weight-mask generator must survive a restart too
        "--run-dir",
        str(run_dir),
        *extra,
    ]


def start(data, run_dir: Path, *extra: str, hooks: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        command(data, run_dir, *extra, hooks=hooks),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [int(re.match(r"ckpt-(\d+)-", p.name).group(1)) for p in list_checkpoints(run_dir)]


def run_state(run_dir: Path) -> dict:
    latest = load_latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None
    return latest[1]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    a, b = run_state(run_dir), run_state(reference)
    assert a["global_step"] == b["global_step"] == 2 * STEPS_PER_EPOCH
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["ema"], b["ema"])
    assert_same_weights(a["optimizer"]["state"][0], b["optimizer"]["state"][0])  # momentum
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(read_metrics(run_dir)) == strip(read_metrics(reference))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code, _, err = finish(start(data, run_dir))
    assert code == 0, err
    return run_dir


def test_sigkill_mid_epoch_and_corrupt_checkpoint_resume_exactly(data, tmp_path, reference):
    run_dir = tmp_path / "run"
    every_step = ("--save-progress-seconds", "0")  # a checkpoint after every step
    # Killed in the middle of epoch 1, right after step 5 (before its checkpoint).
    proc = start(data, run_dir, *every_step, hooks=("--signal-at", "5:SIGKILL"))
    assert finish(proc)[0] == -signal.SIGKILL
    steps = checkpoint_steps(run_dir / "checkpoints")
    assert max(steps) == 4 and len(steps) == 2  # keep 2
    # Resumed, then killed again in the middle of epoch 2, right after step 21.
    proc = start(
        data, run_dir, *every_step, hooks=("--signal-at", f"{STEPS_PER_EPOCH + 5}:SIGKILL")
    )
    assert finish(proc)[0] == -signal.SIGKILL
    steps = checkpoint_steps(run_dir / "checkpoints")
    assert max(steps) == STEPS_PER_EPOCH + 4
    # The newest checkpoint gets corrupted (a bit flip): the previous one is used.
    newest = list_checkpoints(run_dir / "checkpoints")[0]
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    newest.write_bytes(bytes(raw))
    code, out, err = finish(start(data, run_dir, *every_step))
    assert code == 0, err
    assert "skipping unusable checkpoint" in err and newest.name in err
    assert f"resuming from ckpt-{STEPS_PER_EPOCH + 3:09d}-" in out
    assert_same_run(run_dir, reference)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_save_and_exit_cleanly(data, tmp_path, reference, sig, code):
    run_dir = tmp_path / "run"
    name = signal.Signals(sig).name
    at = STEPS_PER_EPOCH + 4  # in epoch 2; no time-based checkpoints: only the signal writes one
    returncode, _, err = finish(start(data, run_dir, hooks=("--signal-at", f"{at}:{name}")))
    assert returncode == code, err
    assert f"interrupted by {name}; checkpoint saved to" in err and "Traceback" not in err
    state = run_state(run_dir)
    assert state["global_step"] == at and state["batch"] == 4
    assert checkpoint_steps(run_dir / "checkpoints") == [at, STEPS_PER_EPOCH]
    returncode, out, err = finish(start(data, run_dir))
    assert returncode == 0, err
    assert f"batch 4/{STEPS_PER_EPOCH}" in out
    assert_same_run(run_dir, reference)


def test_checkpoint_holds_everything_needed(reference):
    state = run_state(reference)
    keys = {"model", "optimizer", "scheduler", "step_helper", "ema", "epoch", "batch", "rng"}
    keys |= {"global_step", "epoch_stats", "history", "config"}
    assert keys <= state.keys()
    assert state["scheduler"]["steps_done"] == 2 * STEPS_PER_EPOCH
    assert {"torch", "python", "numpy"} <= state["rng"].keys()
    assert isinstance(state["rng"]["torch"], torch.Tensor)
    assert len(list((reference / "checkpoints").glob("ckpt-*.pt"))) == 2  # keep 2


# ---------------------------------------------------------------------------------------------
# In process: a stochastic model (dropout), stopped mid-epoch by --max-steps and continued
# ---------------------------------------------------------------------------------------------


def _dropout_net(num_classes: int = 10, in_channels: int = 1, **kw) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, 8, 3, stride=2),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, num_classes),
    )


def test_stochastic_model_resumes_mid_epoch_with_the_same_random_draws(data, tmp_path):
    from samkit.cli import main
    from samkit.models import is_model, register_model

    if not is_model("test_dropout_net"):
        register_model("test_dropout_net")(_dropout_net)
    argv = ["train", *FAST, "--data-dir", str(data.dirs["fashion_mnist"]), "--batch-size", "8"]
    argv += ["--model-name", "test_dropout_net", "--num-epochs", "2", "--no-tensorboard"]
    assert main([*argv, "--run-dir", str(tmp_path / "a")]) == 0
    b = ["--run-dir", str(tmp_path / "b")]
    assert main([*argv, *b, "--max-steps", "21"]) == 0  # stops in epoch 2, checkpoint saved
    torch.manual_seed(1234)  # whatever the global RNG holds now, the checkpoint's state wins
    assert main([*argv, *b]) == 0
    assert_same_weights(run_state(tmp_path / "a")["model"], run_state(tmp_path / "b")["model"])
    # Without the dropout masks replayed from the checkpoint's RNG state they would differ:
    c = ["--run-dir", str(tmp_path / "c")]
    assert main([*argv, *c, "--max-steps", "21"]) == 0
    state_path = list_checkpoints(tmp_path / "c" / "checkpoints")[0]
    state = torch.load(state_path, weights_only=True)
    state["rng"]["torch"] = torch.Generator().manual_seed(99).get_state()
    from samkit.rundir import save_checkpoint

    state_path.unlink()
    state.pop("format")
    save_checkpoint(state, tmp_path / "c" / "checkpoints", state["global_step"])
    assert main([*argv, *c]) == 0
    a_fc = run_state(tmp_path / "a")["model"]["6.weight"]
    assert not torch.equal(a_fc, run_state(tmp_path / "c")["model"]["6.weight"])


def test_sigterm_during_the_final_evaluation_saves_and_exits_143(data, tmp_path):
    # The evaluation after --max-steps runs after the training loop; a signal there used to
    # kill the process with the default handler (no message).
    run_dir = tmp_path / "run"
    proc = start(
        data, run_dir, "--max-steps", "3", "--save-progress-seconds", "0",
        hooks=("--signal-in-eval", "SIGTERM"),  # sent as the (final) evaluation starts
    )  # fmt: skip
    code, _, err = finish(proc)
    assert code == 143, err
    assert "interrupted by SIGTERM; checkpoint saved" in err
    assert run_state(run_dir)["global_step"] == 3
    assert not (run_dir / "summary.json").exists()
    code, out, err = finish(start(data, run_dir, "--max-steps", "3"))
    assert code == 0, err
    assert "resuming from" in out and (run_dir / "summary.json").exists()


def test_wall_seconds_add_up_over_resumes(data, tmp_path):
    # A resumed run's wall time is its earlier processes' (up to the checkpoint it resumed from)
    # plus its own; it used to restart from 0, which made a report's wall time of a resumed
    # sweep cell a fraction of the run's.
    from samkit.cli import main
    from samkit.rundir import save_checkpoint

    run_dir = tmp_path / "run"
    argv = ["train", *FAST, "--data-dir", str(data.dirs["fashion_mnist"]), "--batch-size", "8"]
    argv += ["--model-name", "resnet_tiny", "--num-epochs", "2", "--no-tensorboard"]
    argv += ["--run-dir", str(run_dir)]
    assert main([*argv, "--max-steps", str(STEPS_PER_EPOCH + 3)]) == 0
    path = list_checkpoints(run_dir / "checkpoints")[0]
    state = torch.load(path, weights_only=True)
    assert 0.0 < state["wall_seconds"] < 600.0  # the first process's, at the checkpoint
    state["wall_seconds"] = 1000.0  # as if the first process had run for 1,000 s
    path.unlink()
    state.pop("format")
    save_checkpoint(state, run_dir / "checkpoints", state["global_step"])
    assert main(argv) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 1000.0 < summary["wall_seconds"] < 1600.0
    last = read_metrics(run_dir)[-1]
    assert last["epoch"] == 2 and 1000.0 < last["wall_seconds"] <= summary["wall_seconds"]
