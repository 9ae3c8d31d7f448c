"""Running a sweep's cells as cluster jobs through submitit (Slurm, or its local executor).

Each unfinished cell becomes one job that runs the same command as on one machine
(:func:`samkit.sweep.runner.cell_command`, optionally a ``torchrun`` job of several processes),
its output appended to ``SWEEP_DIR/logs/``. Rerunning the sweep submits only the cells that have
not finished; an interrupted cell resumes from its checkpoint. submitit is optional: it is
imported only here (``pip install 'samkit[cluster]'``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from samkit.sweep.runner import (
    CellResult,
    cell_command,
    is_finished,
    log_path,
    run_command_logged,
)
from samkit.sweep.spec import Cell

__all__ = ["submit_cells"]


def submit_cells(
    sweep_dir: Path,
    cells: list[Cell],
    *,
    cluster: str | None,
    folder: Path,
    threads: int,
    nproc_per_node: int = 1,
    train_command: list[str] | None = None,
    parameters: dict[str, Any] | None = None,
    wait: bool = True,
    log: Callable[[str], None] = print,
) -> list[CellResult]:
    """Submit the unfinished cells (``cluster``: "slurm", "local", or None for submitit's
    choice); with ``wait``, wait for them and report each as it ends."""
    try:  # optional dependency
        import submitit
    except ImportError:
        raise RuntimeError(
            "the submitit launcher needs submitit: pip install 'samkit[cluster]'"
        ) from None
    todo = [c for c in cells if not is_finished(sweep_dir, c)]
    results = [CellResult(c, "skipped") for c in cells if c not in todo]
    log(f"{len(cells)} cells: {len(results)} finished before, {len(todo)} to submit")
    if not todo:
        return results
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    executor.update_parameters(
        **{
            "timeout_min": 24 * 60,
            "nodes": 1,
            "tasks_per_node": 1,
            "cpus_per_task": threads * nproc_per_node,
            "name": f"samkit-{sweep_dir.name}",
            **(parameters or {}),
        }
    )
    jobs = []
    for cell in todo:
        cmd = cell_command(
            sweep_dir,
            cell,
            threads=threads,
            nproc_per_node=nproc_per_node,
            train_command=train_command,
        )
        job = executor.submit(run_command_logged, cmd, log_path(sweep_dir, cell))
        log(f"submitted {cell.name} seed {cell.seed}: job {job.job_id}")
        jobs.append((cell, job))
    if not wait:
        return results
    for i, (cell, job) in enumerate(jobs, start=1):
        try:
            code = job.result()
        except Exception as exc:  # submitit re-raises the job's failure here
            log(f"failed [{i}/{len(jobs)}] {cell.name} seed {cell.seed}: {exc}")
            results.append(CellResult(cell, "failed"))
            continue
        status = "done" if code == 0 else "failed"
        log(f"{status} [{i}/{len(jobs)}] {cell.name} seed {cell.seed}: exit status {code}")
        results.append(CellResult(cell, status, returncode=code))
    return results
