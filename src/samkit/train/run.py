"""A training run's parts (:class:`Run`) and their checkpoints: save, interrupt, resume,
start over, and the check that a run directory's checkpoints belong to the same settings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
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
    load_latest_checkpoint,
    read_config,
    save_checkpoint,
)
from samkit.train import distributed, records
from samkit.train.config import RESUME_IGNORED, TrainConfig
from samkit.train.ema import EMA
from samkit.train.errors import ConfigError, TrainingInterrupted
from samkit.train.hooks import TrainHooks
from samkit.train.schedule import CosineSchedule
from samkit.train.signals import StopSignals
from samkit.train.state import RunState, rng_state, set_rng_state
from samkit.train.step import SharpnessAwareStep

__all__ = [
    "Run",
    "check_same_settings",
    "discard_checkpoints",
    "refuse_foreign_directory",
    "interrupted",
    "resume",
    "save",
]


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

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main


def checkpoint_state(run: Run, state: RunState) -> dict[str, Any]:
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.schedule.state_dict(),
        "step_helper": run.step_fn.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        **state.state_dict(),
        "steps_per_epoch": len(run.train_loader),
        "world_size": 1 if run.dist is None else run.dist.world_size,
        "rng": rng_state(run.device),
        "config": run.cfg.to_dict(),
    }


def save(run: Run, state: RunState) -> Path | None:
    """Checkpoint the current position; a same-step one (written moments ago at the same
    position, e.g. before an epoch-end evaluation) is replaced. Under torchrun only rank 0 writes
    (the ranks hold the same weights)."""
    run.last_save = time.monotonic()
    if not run.is_main:
        return None
    directory = run.run_dir / CHECKPOINT_DIR
    prefix = f"ckpt-{state.global_step:09d}-"
    same_step = [p for p in list_checkpoints(directory) if p.name.startswith(prefix)]
    path = save_checkpoint(
        checkpoint_state(run, state), directory, state.global_step, keep=2 + len(same_step)
    )
    for p in same_step:
        if p != path:
            p.unlink(missing_ok=True)
    run.last_save = time.monotonic()
    return path


def interrupted(run: Run, state: RunState) -> None:
    """Save and raise :class:`TrainingInterrupted` for the signal that asked to stop."""
    path = save(run, state)
    signum = run.signals.requested()
    assert signum is not None
    raise TrainingInterrupted(signum, path)


def resume(run: Run, state: RunState) -> None:
    """Load the latest good checkpoint into the run's parts and ``state``, if there is one."""
    latest = load_latest_checkpoint(run.run_dir / CHECKPOINT_DIR, map_location=run.device)
    if latest is None:
        return
    path, saved = latest
    steps_per_epoch = len(run.train_loader)
    if saved.get("steps_per_epoch") != steps_per_epoch:
        raise CheckpointError(
            f"{path}: written for {saved.get('steps_per_epoch')} steps per epoch, this run "
            f"has {steps_per_epoch}; the data changed (use --no-resume to start over)"
        )
    world_size = 1 if run.dist is None else run.dist.world_size
    if int(saved.get("world_size", 1)) != world_size:
        raise CheckpointError(
            f"{path}: written by a run with {saved.get('world_size', 1)} processes, this one "
            f"has {world_size}; the perturbations (m = per-process batch) would change "
            "(use --no-resume to start over)"
        )
    try:
        run.model.load_state_dict(saved["model"])
        run.optimizer.load_state_dict(saved["optimizer"])
        run.schedule.load_state_dict(saved["scheduler"])
        run.step_fn.load_state_dict(saved["step_helper"])
        if run.ema is not None:
            run.ema.load_state_dict(saved["ema"])
        state.load_state_dict(saved)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: does not fit this run ({type(exc).__name__}: {exc}); use --no-resume "
            "to start over"
        ) from None
    set_rng_state(saved["rng"], run.device)
    state.resumed_from = path


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
    defaults = TrainConfig().to_dict()
    diffs = [
        f"--{key.replace('_', '-')} {old.get(key, defaults[key])!r} -> {value!r}"
        for key, value in cfg.to_dict().items()
        if key not in RESUME_IGNORED and old.get(key, defaults[key]) != value
    ]
    if diffs:
        raise ConfigError(
            f"{run_dir} holds a run with other settings ({'; '.join(diffs[:6])}"
            f"{'; ...' if len(diffs) > 6 else ''}); refusing to mix them: use --no-resume to "
            "discard that run, or another --output-dir / --run-dir"
        )
