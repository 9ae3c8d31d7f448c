"""A training run's parts (:class:`Run`) and their checkpoints: save, interrupt, resume,
start over, and the check that a run directory's checkpoints belong to the same settings."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from samkit.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LOCK_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    read_config,
    save_checkpoint,
    set_aside,
)
from samkit.train import distributed, records
from samkit.train.config import TrainConfig, settings_differences
from samkit.train.ema import EMA
from samkit.train.errors import ConfigError, TrainingDivergedError, TrainingInterrupted
from samkit.train.hooks import TrainHooks
from samkit.train.schedule import CosineSchedule
from samkit.train.signals import StopSignals
from samkit.train.state import RunState, rng_state, set_rng_state
from samkit.train.step import SharpnessAwareStep
from samkit.train.trajectory import TrajectoryLoss

__all__ = [
    "MAX_SKIPPED_IN_A_ROW",
    "Run",
    "check_same_settings",
    "discard_checkpoints",
    "refuse_foreign_directory",
    "interrupted",
    "resume",
    "save",
    "set_aside_unusable",
    "step_done",
]

#: Consecutive skipped steps (non-finite loss or gradients each time) that end a run as diverged:
#: far more than fp16 loss scaling ever skips in a row (each skip halves the scale).
MAX_SKIPPED_IN_A_ROW = 100


@dataclass
class Run:
    """The parts of a run, built once; the functions below train, evaluate and save with them."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    dist: distributed.DistInfo | None
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step_fn: SharpnessAwareStep
    schedule: CosineSchedule
    ema: EMA | None
    train_loader: Any
    eval_loader: Any
    log: Callable[[str], None]
    hooks: TrainHooks
    signals: StopSignals
    scalars: records.Scalars | None = None
    wall_start: float = 0.0
    eval_copy: torch.nn.Module | None = None  # with EMA: the model that holds the averaged weights
    last_save: float = 0.0
    last_good: Path | None = None  # the newest checkpoint after which a step was taken
    candidate: Path | None = None  # the newest checkpoint, until a step confirms it
    skipped_in_row: int = 0
    unusable: list[tuple[Path, str]] = field(default_factory=list)  # passed over by resume
    trajectory: TrajectoryLoss | None = None  # SAF's stored logits or MESA's teacher

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main


def checkpoint_state(run: Run, state: RunState) -> dict[str, Any]:
    return {
        **_parts_state(run, state),
        "steps_per_epoch": len(run.train_loader),
        "world_size": 1 if run.dist is None else run.dist.world_size,
        "config": run.cfg.to_dict(),
        "last_good": run.last_good.name if run.last_good is not None else None,
        "wall_seconds": wall_seconds(run, state),
    }


def wall_seconds(run: Run, state: RunState) -> float:
    """The run's wall time so far: this process's, plus its earlier processes' up to the
    checkpoint it resumed from (work lost after that checkpoint does not count)."""
    return state.wall_seconds_before + time.perf_counter() - run.wall_start


def save(run: Run, state: RunState) -> Path | None:
    """Checkpoint the current position; a same-step one (written moments ago at the same
    position, e.g. before an epoch-end evaluation) is replaced. Under torchrun only rank 0 writes
    (the ranks hold the same weights).

    Weights, buffers or EMA that are not finite are never written: the run ends with
    :class:`TrainingDivergedError` naming the last good checkpoint. Rotation (keep 2) never
    deletes the last checkpoint known good (one after which a step was taken).
    """
    if not _all_finite(run):
        raise TrainingDivergedError(
            divergence_message(run, state, "the weights or BatchNorm statistics are not finite")
        )
    run.last_save = time.monotonic()
    if not run.is_main:
        return None
    directory = run.run_dir / CHECKPOINT_DIR
    prefix = f"ckpt-{state.global_step:09d}-"
    same_step = [p for p in list_checkpoints(directory) if p.name.startswith(prefix)]
    protect = [run.last_good] if run.last_good is not None else []
    path = save_checkpoint(
        checkpoint_state(run, state),
        directory,
        state.global_step,
        keep=2 + len(same_step),
        protect=[p for p in protect if p not in same_step],
    )
    for p in same_step:
        if p != path:
            p.unlink(missing_ok=True)
    if run.last_good in same_step:  # the same position, so just as good
        run.last_good = path
    run.candidate = path
    run.last_save = time.monotonic()
    return path


def step_done(run: Run, state: RunState, took_step: bool) -> None:
    """After each step: a taken step confirms the checkpoint written just before it as good; a
    run of :data:`MAX_SKIPPED_IN_A_ROW` skipped steps (non-finite loss or gradients every time)
    ends the run as diverged."""
    if took_step:
        run.skipped_in_row = 0
        if run.candidate is not None:
            run.last_good, run.candidate = run.candidate, None
        return
    run.skipped_in_row += 1
    if run.skipped_in_row >= MAX_SKIPPED_IN_A_ROW:
        raise TrainingDivergedError(
            divergence_message(
                run,
                state,
                f"the last {run.skipped_in_row} steps were all skipped (non-finite loss or "
                "gradients)",
            )
        )


def divergence_message(run: Run, state: RunState, why: str) -> str:
    """The one line a diverged run ends with: why, where, and what is left to fall back on."""
    if run.last_good is not None:
        kept = (
            "the last checkpoint whose weights still trained (finite loss and gradients) is "
            f"{run.last_good}"
        )
    else:
        kept = "no checkpoint of this run was followed by a step taken (finite loss and gradients)"
    return (
        f"training diverged at step {state.global_step}: {why}; {kept} (nothing non-finite is "
        "ever checkpointed); try a smaller --learning-rate or --sam-rho, with --no-resume"
    )


def _all_finite(run: Run) -> bool:
    tensors = [t for t in run.model.state_dict().values() if t.is_floating_point()]
    if run.ema is not None:
        tensors += [t for t in run.ema.state_dict().values() if t.is_floating_point()]
    if not tensors:
        return True
    flags = torch.stack([torch.isfinite(t).all() for t in tensors])
    return bool(flags.all())


def interrupted(run: Run, state: RunState) -> None:
    """Save and raise :class:`TrainingInterrupted` for the signal that asked to stop."""
    path = save(run, state)
    signum = run.signals.requested()
    assert signum is not None
    raise TrainingInterrupted(signum, path)


def resume(run: Run, state: RunState) -> None:
    """Load the newest usable checkpoint into the run's parts and ``state``, if there is one.

    A checkpoint that is corrupt (checksum, unreadable) or malformed (a field missing or not
    fitting the model) is passed over for the one before it, and listed in ``run.unusable``
    (:func:`set_aside_unusable` renames them once every process has read its checkpoint). A
    checkpoint written with other settings, another number of steps per epoch or of processes
    is refused with :class:`ConfigError`: it is the run that does not fit, not the file.
    """
    paths = list_checkpoints(run.run_dir / CHECKPOINT_DIR)
    fresh: dict[str, Any] | None = None
    for path in paths:
        try:
            saved = load_checkpoint(path, map_location=run.device)
            check_fits(run, path, saved)
            if fresh is None:  # what the parts hold before any checkpoint is tried
                fresh = copy.deepcopy(_parts_state(run, RunState(run.device)))
            _load_parts(run, state, path, saved)
        except CheckpointError as exc:
            run.unusable.append((path, str(exc)))
            if fresh is not None:
                _load_parts(run, state, path, fresh)
            continue
        state.resumed_from = run.candidate = path
        last_good = saved.get("last_good")
        if isinstance(last_good, str) and (path.parent / last_good).is_file():
            run.last_good = path.parent / last_good
        return
    if run.unusable:
        raise CheckpointError(
            "no usable checkpoint: " + "; ".join(reason for _, reason in run.unusable)
        )


def check_fits(run: Run, path: Path, saved: dict[str, Any]) -> None:
    """Refuse a checkpoint written for other settings (its embedded config, by the rules used for
    config.json), another number of steps per epoch, or another number of processes."""
    config = saved.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: malformed checkpoint (no settings recorded in it)")
    diffs = settings_differences(config, run.cfg)
    if diffs:
        raise ConfigError(
            f"{path} was written with other settings than this command's ({'; '.join(diffs[:6])}"
            f"{'; ...' if len(diffs) > 6 else ''}), although {CONFIG_FILE} agrees with the "
            "command (edited?); refusing to resume it: use --no-resume to start over, or another "
            "--output-dir / --run-dir"
        )
    steps_per_epoch = len(run.train_loader)
    if saved.get("steps_per_epoch") != steps_per_epoch:
        raise ConfigError(
            f"{path}: written for {saved.get('steps_per_epoch')} steps per epoch, this run "
            f"has {steps_per_epoch}; the data changed (use --no-resume to start over)"
        )
    world_size = 1 if run.dist is None else run.dist.world_size
    if saved.get("world_size", 1) != world_size:
        raise ConfigError(
            f"{path}: written by a run with {saved.get('world_size', 1)} processes, this one "
            f"has {world_size}; the perturbations (m = per-process batch) would change "
            "(use --no-resume to start over)"
        )


def _parts_state(run: Run, state: RunState) -> dict[str, Any]:
    """What :func:`_load_parts` loads: the run's parts, ``state`` and the RNG states."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.schedule.state_dict(),
        "step_helper": run.step_fn.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        **state.state_dict(),
        "rng": rng_state(run.device),
        # only in SAF / MESA runs, so that every other run's checkpoints stay as they were
        **({"trajectory": run.trajectory.state_dict()} if run.trajectory is not None else {}),
    }


def _load_parts(run: Run, state: RunState, path: Path, saved: dict[str, Any]) -> None:
    """Load ``saved`` into the run's parts; anything that does not fit is a malformed file."""
    try:
        run.model.load_state_dict(saved["model"])
        run.optimizer.load_state_dict(saved["optimizer"])
        run.schedule.load_state_dict(saved["scheduler"])
        run.step_fn.load_state_dict(saved["step_helper"])
        if run.ema is not None:
            run.ema.load_state_dict(saved["ema"])
        if run.trajectory is not None:
            run.trajectory.load_state_dict(saved["trajectory"])
        loaded = RunState(run.device)
        loaded.load_state_dict(saved)
        set_rng_state(saved["rng"], run.device)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise CheckpointError(
            f"{path}: malformed checkpoint ({type(exc).__name__}: {detail[:200]})"
        ) from None
    vars(state).update(vars(loaded))


def set_aside_unusable(run: Run) -> None:
    """Rename the checkpoints :func:`resume` passed over to ``*.bad`` (kept for inspection, never
    loaded or rotated again) and say so (a RuntimeWarning)."""
    for path, reason in run.unusable:
        try:
            where = f"set aside as {set_aside(path).name}"
        except OSError as exc:
            where = f"could not be set aside ({exc})"
        resumed = f"; resuming from {run.candidate.name}" if run.candidate else ""
        warnings.warn(
            f"skipping unusable checkpoint: {reason}; {where}{resumed}",
            RuntimeWarning,
            stacklevel=2,
        )


def discard_checkpoints(run: Run) -> None:
    """--no-resume: delete the run directory's checkpoints, metrics and summary."""
    directory = run.run_dir / CHECKPOINT_DIR
    existing = list_checkpoints(directory)
    for path in existing:
        path.unlink(missing_ok=True)
    if existing:
        for path in (run.run_dir / METRICS_FILE, run.run_dir / SUMMARY_FILE):
            path.unlink(missing_ok=True)
        run.log(f"--no-resume: discarded {len(existing)} checkpoint(s) in {directory}")


def refuse_foreign_directory(run_dir: Path) -> None:
    """A directory that holds files but is not a samkit run (no config.json) is never written
    into: its files could be overwritten (a run writes config.json before anything else but its
    lock file)."""
    if not run_dir.is_dir() or (run_dir / CONFIG_FILE).is_file():
        return
    others = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
    if others:
        raise ConfigError(
            f"{run_dir}: holds files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
            " but is not a samkit run directory (no config.json); refusing to write into it: "
            "choose another --run-dir / --output-dir"
        )


def check_same_settings(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to resume a run directory whose checkpoints were written with other settings."""
    if not list_checkpoints(run_dir / CHECKPOINT_DIR):
        return
    try:
        old = read_config(run_dir)
    except (OSError, ValueError):
        raise ConfigError(
            f"{run_dir} holds checkpoints but no readable {CONFIG_FILE}; cannot check "
            "that they belong to this configuration (use --no-resume to start over, or "
            "another --output-dir / --run-dir)"
        ) from None
    diffs = settings_differences(old, cfg)
    if diffs:
        raise ConfigError(
            f"{run_dir} holds a run with other settings ({'; '.join(diffs[:6])}"
            f"{'; ...' if len(diffs) > 6 else ''}); refusing to mix them: use --no-resume to "
            "discard that run, or another --output-dir / --run-dir"
        )
