"""Running a sweep's cells on this machine: N ``samkit train`` processes at a time.

Each cell is an ordinary ``samkit train --run-dir SWEEP_DIR/<cell>/seed_<seed>`` process (or a
``torchrun`` job of several), its output in ``SWEEP_DIR/logs/``. A cell whose run directory
holds a finished summary for the same settings is skipped; any other cell is started, and
``samkit train`` resumes it from its latest checkpoint. So a sweep killed at any moment (even by
SIGKILL: its children die with it) and started again loses nothing and runs nothing twice.
SIGINT / SIGTERM stop the running cells, which save a checkpoint first.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samkit.rundir import layout as keys
from samkit.rundir import read_summary, write_json
from samkit.sweep.spec import Cell, SweepSpec, check_cell, train_argv
from samkit.train.build import resolve_paths
from samkit.train.config import settings_differences

__all__ = [
    "LOG_DIR",
    "MANIFEST",
    "CellResult",
    "cell_command",
    "is_finished",
    "run_cells",
    "write_manifest",
]

MANIFEST = keys.SWEEP_FILE
LOG_DIR = "logs"
FINISHED = (keys.COMPLETED, keys.MAX_STEPS)


@dataclass
class CellResult:
    cell: Cell
    status: str  # "done", "skipped" (finished before), "failed", "stopped" (by a signal)
    seconds: float = 0.0
    returncode: int | None = None
    test_error: float | None = None


def write_manifest(sweep_dir: Path, spec: SweepSpec, cells: list[Cell]) -> Path:
    """``SWEEP_DIR/sweep.json``: the spec and every cell (what ``samkit report`` reads)."""
    return write_json(
        sweep_dir / MANIFEST,
        {
            "format": keys.SWEEP_FORMAT,
            "name": spec.name,
            "spec": spec.to_dict(),
            "report": spec.report,
            "cells": [c.to_dict() for c in cells],
        },
    )


def is_finished(sweep_dir: Path, cell: Cell) -> bool:
    """True when the cell's run finished with the cell's settings (the ones that change what is
    trained; a changed spec reruns the cell, and samkit train then refuses the mismatch)."""
    summary = read_summary(sweep_dir / cell.run_dir)
    if summary.get(keys.STATUS) not in FINISHED:
        return False
    have = summary.get("config", {})
    return not settings_differences(have, resolve_paths(check_cell(cell, "sweep")))


def cell_command(
    sweep_dir: Path,
    cell: Cell,
    *,
    threads: int,
    nproc_per_node: int = 1,
    train_command: list[str] | None = None,
) -> list[str]:
    """The command that trains ``cell``: ``python -m samkit train ...``, or under torchrun.

    ``train_command`` replaces ``python -m samkit`` (e.g. a wrapper script: ``python wrap.py``);
    under torchrun its first word, the interpreter, is torchrun's."""
    argv = [
        "train",
        *train_argv(cell.flags),
        "--run-seed", str(cell.seed),
        "--run-dir", str((sweep_dir / cell.run_dir).absolute()),
        "--threads", str(threads),
        "--no-progress",
    ]  # fmt: skip
    program = train_command or [sys.executable, "-m", "samkit"]
    if nproc_per_node > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc_per_node}"]  # fmt: skip
        return launcher + program[1:] + argv
    return program + argv


def log_path(sweep_dir: Path, cell: Cell) -> Path:
    return sweep_dir / LOG_DIR / f"{cell.name}-seed_{cell.seed}.log"


try:  # looked up once, in the parent: the child (after fork) only calls it
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _die_with_parent() -> None:
    """In the child, before exec: be killed when the sweep process dies (Linux's
    PR_SET_PDEATHSIG), so that a killed sweep leaves no orphan writing into a run directory.
    Elsewhere the children outlive a SIGKILLed sweep."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)


def run_command_logged(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` with its output appended to ``log``; its exit status. (Also what a submitit
    job runs, so it is a plain module-level function.)"""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode


class _Stop:
    """SIGINT / SIGTERM: start no more cells and pass SIGTERM on to the running ones."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        with self.lock:
            for proc in self.running:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def run_cells(
    sweep_dir: Path,
    cells: list[Cell],
    *,
    workers: int,
    threads: int,
    nproc_per_node: int = 1,
    train_command: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[CellResult]:
    """Run the cells that have not finished, ``workers`` at a time; one line per cell as it
    starts and ends, with an estimate of the time left."""
    todo, results = [], []
    for cell in cells:
        if is_finished(sweep_dir, cell):
            results.append(CellResult(cell, "skipped"))
        else:
            todo.append(cell)
    log(
        f"{len(cells)} cells: {len(results)} finished before, {len(todo)} to run, "
        f"{workers} at a time x {threads * nproc_per_node} thread(s)"
    )
    durations: list[float] = []
    done_count = [0]
    stop = _Stop()

    def run_one(cell: Cell) -> CellResult:
        if stop.signum is not None:
            return CellResult(cell, "stopped")
        cmd = cell_command(
            sweep_dir,
            cell,
            threads=threads,
            nproc_per_node=nproc_per_node,
            train_command=train_command,
        )
        path = log_path(sweep_dir, cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        t0 = time.monotonic()
        log(f"start {cell.name} seed {cell.seed} (log: {path})")
        with path.open("a") as out:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
            )
            with stop.lock:
                stop.running.add(proc)
            code = proc.wait()
            with stop.lock:
                stop.running.discard(proc)
        seconds = time.monotonic() - t0
        summary = read_summary(sweep_dir / cell.run_dir) if code == 0 else {}
        error = summary.get(keys.FINAL_TEST_ERROR_RATE)
        status = "done" if code == 0 else ("stopped" if stop.signum is not None else "failed")
        with stop.lock:
            done_count[0] += 1
            if status == "done":
                durations.append(seconds)
            left = len(todo) - done_count[0]
            eta = (
                f"; about {_duration(sum(durations) / len(durations) * left / workers)} left"
                if durations and left
                else ""
            )
        what = f"test error {error:.2%}" if error is not None else f"exit status {code}"
        log(
            f"{status} [{done_count[0]}/{len(todo)}] {cell.name} seed {cell.seed} in "
            f"{_duration(seconds)}: {what}{eta}"
        )
        return CellResult(cell, status, seconds, code, error)

    with stop, ThreadPoolExecutor(max_workers=workers) as pool:
        results += list(pool.map(run_one, todo))
    if stop.signum is not None:
        raise KeyboardInterrupt(stop.signum)
    return results
