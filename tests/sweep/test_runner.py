"""Running sweeps: parallel workers, skipping finished cells, resuming after SIGKILL, submitit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from samkit.cli import main
from samkit.rundir import read_metrics, read_summary

ENTRY = Path(__file__).resolve().parents[1] / "samkit_entry.py"  # samkit + test hooks
TINY = ["--set", "model_name=resnet_tiny", "--set", "batch_size=16", "--set", "tensorboard=false"]


def sweep_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", *TINY, "--set", f"data_dir={data}", "--grid", "optimizer=sgd,sam",
            "--seeds", "0", "1", "--output", str(out), "--threads", "1", *extra]  # fmt: skip


def commands_run(out: Path) -> dict[str, int]:
    """How many times each cell's samkit train was started (its log holds one line per start)."""
    return {
        log.stem: sum(line.startswith("$ ") for line in log.read_text().splitlines())
        for log in (out / "logs").glob("*.log")
    }


def test_a_sweep_runs_in_parallel_and_a_rerun_runs_nothing(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "sw"
    argv = sweep_argv(fmnist_dir, out, "--set", "num_epochs=1", "--workers", "2")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 cells: 0 finished before, 4 to run, 2 at a time x 1 thread(s)" in printed
    assert printed.count("\ndone [") + printed.startswith("done [") == 4
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["format"] == "samkit-sweep/1" and len(manifest["cells"]) == 4
    for cell in manifest["cells"]:
        run = out / cell["run_dir"]
        summary = read_summary(run)
        assert summary["status"] == "completed"
        assert summary["config"]["optimizer"] == cell["flags"]["optimizer"]
        assert summary["config"]["run_seed"] == cell["seed"]
    assert set(commands_run(out).values()) == {1}
    # Again: everything finished, nothing runs.
    assert main(argv) == 0
    assert "4 cells: 4 finished before, 0 to run" in capsys.readouterr().out
    assert set(commands_run(out).values()) == {1}
    # A changed setting is a different run: the cells run again (and samkit train refuses to
    # mix it with the old run directory, so they fail loudly instead of being skipped).
    assert main(sweep_argv(fmnist_dir, out, "--set", "num_epochs=2", "--workers", "2")) == 1
    assert (
        "holds a run with other settings" in (out / "logs" / "optimizer=sgd-seed_0.log").read_text()
    )


def _processes_naming(marker: str) -> list[int]:
    """The processes whose command line names ``marker`` (the killed sweep's cells)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="children die with the sweep on Linux"
)
def test_sigkill_mid_sweep_loses_nothing_and_repeats_nothing(fmnist_dir, tmp_path):
    out = tmp_path / "sw"
    # The first cell to finish step 5 pauses there (its checkpoints written) until killed; the
    # other worker runs the three other cells to the end. Then the sweep is killed.
    paused = tmp_path / "paused"
    pausing = f"{sys.executable} {ENTRY} --pause-at 5:{paused}"
    every_step = ["--set", "num_epochs=3", "--set", "save_progress_seconds=0", "--workers", "2"]
    argv = sweep_argv(fmnist_dir, out, *every_step, "--train-command", pausing)
    proc = subprocess.Popen([sys.executable, "-m", "samkit", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600  # generous: only a hung sweep should reach it
        while not (paused.exists() and len(list(out.glob("*/seed_*/summary.json"))) == 3):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the sweep made no progress"
            time.sleep(0.05)
        started = [c.parent.parent for c in out.glob("*/seed_*/checkpoints/ckpt-*.pt")]
        assert [r for r in started if not (r / "summary.json").exists()]  # one cell mid-run
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    # The running cells died with the sweep: none is left writing into the run directories.
    deadline = time.monotonic() + 120
    while _processes_naming(str(out)):
        assert time.monotonic() < deadline, "a cell outlived the killed sweep"
        time.sleep(0.1)
    finished_before = {p.parent for p in out.glob("*/seed_*/summary.json")}
    runs_before = commands_run(out)

    assert main(sweep_argv(fmnist_dir, out, *every_step)) == 0
    runs_after = commands_run(out)
    logs = {log.name: log.read_text() for log in (out / "logs").glob("*.log")}
    for run in out.glob("*/seed_*"):
        name = f"{run.parent.name}-{run.name}"
        assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3], (run, logs)  # each once
        assert read_summary(run)["status"] == "completed"
        if run in finished_before:  # not run again
            assert runs_after[name] == runs_before[name], logs
        else:
            assert runs_after[name] == runs_before.get(name, 0) + 1, logs
    resumed = [log for log in (out / "logs").glob("*.log") if "resuming from" in log.read_text()]
    assert resumed, "the cell killed mid-run did not resume from its checkpoint"


def test_submitit_local_executor_runs_the_cells(fmnist_dir, tmp_path, capsys):
    pytest.importorskip("submitit")
    out = tmp_path / "sw"
    argv = ["sweep", *TINY, "--set", f"data_dir={fmnist_dir}", "--set", "num_epochs=1",
            "--set", "optimizer=sam", "--seeds", "0", "1", "--output", str(out),
            "--threads", "1", "--launcher", "submitit", "--cluster", "local"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("submitted run seed") == 2 and printed.count("done [") == 2
    for seed in (0, 1):
        assert read_summary(out / "run" / f"seed_{seed}")["status"] == "completed"
    assert main(argv) == 0  # nothing left to submit
    assert "2 cells: 2 finished before, 0 to submit" in capsys.readouterr().out
