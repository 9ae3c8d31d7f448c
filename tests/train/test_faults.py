"""The fault suite (issue 15), with real processes: two writers on one run directory, SIGKILL in
the middle of a checkpoint write, a disk that fills up (simulated, and on a real 1.5 MB tmpfs where
the platform allows mounting one). In each case nothing already written is lost, nothing
half-written is left under a real name, and a rerun ends with exactly the uninterrupted weights.
Faults are injected by ``tests/fault_entry.py``; the pause before the second writer is an event
(a file), not a time window."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import FAST, assert_same_weights, read_metrics

from samkit.rundir import list_checkpoints, load_checkpoint, load_latest_checkpoint

ENTRY = Path(__file__).resolve().parents[1] / "fault_entry.py"
STEPS = 8  # 64 images, batches of 16, 2 epochs
TIMING = {"epoch_seconds", "images_per_sec", "wall_seconds"}


def command(data, run_dir: Path, *faults: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, str(ENTRY), *faults, "train", *FAST,
            "--data-dir", str(data.dirs["fashion_mnist"]), "--model-name", "resnet_tiny",
            "--num-epochs", "2", "--batch-size", "16", "--train-subset", "64",
            "--save-progress-seconds", "0", "--no-tensorboard", "--run-dir", str(run_dir),
            *extra]  # fmt: skip


def run(
    data, run_dir: Path, *faults: str, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command(data, run_dir, *faults, extra=extra), capture_output=True, text=True, timeout=300
    )
    return done


def assert_same_run(run_dir: Path, reference: Path) -> None:
    a = load_latest_checkpoint(run_dir / "checkpoints")[1]
    b = load_latest_checkpoint(reference / "checkpoints")[1]
    assert a["global_step"] == b["global_step"] == STEPS
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["optimizer"]["state"][0], b["optimizer"]["state"][0])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(read_metrics(run_dir)) == strip(read_metrics(reference))


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob(".ckpt-*"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = run(data, run_dir)
    assert done.returncode == 0, done.stderr
    return run_dir


def test_a_second_writer_is_refused_while_the_first_runs_on(data, tmp_path, reference):
    run_dir, release = tmp_path / "run", tmp_path / "release"
    first = subprocess.Popen(
        command(data, run_dir, "--pause-after", "3", str(release)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not Path(f"{release}.paused").exists():  # the first holds the lock, mid-epoch
            assert first.poll() is None, first.communicate()
            time.sleep(0.01)
        second = run(data, run_dir, extra=("--learning-rate", "0.5"))
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1
        assert f"in use by another samkit train (PID {first.pid})" in second.stderr
    finally:
        release.touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    # the first run's files only, no duplicated metrics, its config untouched
    assert json.loads((run_dir / "config.json").read_text())["learning_rate"] == 0.1
    assert_same_run(run_dir, reference)
    assert leftovers(run_dir) == []


@pytest.mark.parametrize("nth", [1, 4])
def test_sigkill_during_a_checkpoint_write_loses_nothing_written(data, tmp_path, reference, nth):
    run_dir = tmp_path / "run"
    killed = run(data, run_dir, "--kill-in-save", str(nth))
    assert killed.returncode == -9
    before = list_checkpoints(run_dir / "checkpoints")
    assert len(before) == min(nth - 1, 2)  # the one being written never got its real name
    for path in before:
        load_checkpoint(path)  # every checkpoint under a real name verifies
    assert leftovers(run_dir)  # the temporary file is there ...
    done = run(data, run_dir)
    assert done.returncode == 0, done.stderr
    assert leftovers(run_dir) == []  # ... and is cleaned up by the next write
    assert_same_run(run_dir, reference)


def test_a_full_disk_fails_the_run_in_one_line_and_keeps_the_older_checkpoints(
    data, tmp_path, reference
):
    run_dir = tmp_path / "run"
    failed = run(data, run_dir, "--enospc-in-save", "3")
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1 and "No space left on device" in failed.stderr
    kept = list_checkpoints(run_dir / "checkpoints")
    assert len(kept) == 2 and all(load_checkpoint(p) for p in kept)
    assert leftovers(run_dir) == []  # no half-written file
    done = run(data, run_dir)  # space freed: the same command resumes
    assert done.returncode == 0, done.stderr
    assert_same_run(run_dir, reference)


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_real_full_disk_keeps_every_checkpoint_written(data, small_tmpfs):
    run_dir = small_tmpfs / "run"
    failed = run(data, run_dir)  # a resnet_tiny checkpoint is ~0.9 MB: the second cannot fit
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.count("\n") == 1 and "No space left on device" in failed.stderr
    kept = list_checkpoints(run_dir / "checkpoints")
    assert kept and all(load_checkpoint(p) for p in kept)
    assert leftovers(run_dir) == []
    assert json.loads((run_dir / "config.json").read_text())["model_name"] == "resnet_tiny"
