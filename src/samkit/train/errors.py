"""How a training run fails or stops; the command line maps each to a message and exit status."""

from __future__ import annotations

import signal
from pathlib import Path

__all__ = ["ConfigError", "TrainingDivergedError", "TrainingInterrupted"]


class ConfigError(ValueError):
    """A setting that cannot work (the message names the flag); the CLI exits with status 2."""


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after saving a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path | None):
        self.signum = signum
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint written"
        super().__init__(f"interrupted by {name}; {where}")
