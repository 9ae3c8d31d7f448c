"""A run's model, rebuilt from ``config.json`` and loaded from ``checkpoints/``.

``config.json`` holds at least ``model_name``, ``num_classes``, ``in_channels`` and ``dataset``
(optionally ``model_kwargs``); a checkpoint (:mod:`samkit.rundir.checkpoint`) holds the model's
``state_dict`` under ``"model"`` and, for runs with ``--ema-decay``, the averaged weights under
``"ema"`` (``load_run_model(..., use_ema=...)`` picks them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from samkit.models import create_model
from samkit.rundir.checkpoint import CheckpointError, load_checkpoint, load_latest_checkpoint
from samkit.rundir.layout import CHECKPOINT_DIR, CONFIG_FILE, read_config, resolve_run

__all__ = ["LoadedRun", "load_run_model"]


@dataclass
class LoadedRun:
    """A rebuilt model with its run's config, the checkpoint it came from and that file's state."""

    model: nn.Module
    config: dict[str, Any]
    run_dir: Path
    checkpoint_path: Path
    state: dict[str, Any]
    used_ema: bool = False


def load_run_model(
    path: str | os.PathLike, map_location: Any = "cpu", *, use_ema: bool | None = False
) -> LoadedRun:
    """Rebuild a run's model from its config and load the given (or latest good) checkpoint.

    ``use_ema``: False loads the trained weights (``"model"``); True the exponential moving
    average (``"ema"``, an error if the run kept none); None the EMA if present, else the model.
    """
    run_dir, checkpoint = resolve_run(path)
    config = read_config(run_dir)
    missing = [k for k in ("model_name", "num_classes", "in_channels") if k not in config]
    if missing:
        raise ValueError(f"{run_dir / CONFIG_FILE}: missing keys {missing}")
    if checkpoint is None:
        latest = load_latest_checkpoint(run_dir / CHECKPOINT_DIR, map_location)
        if latest is None:
            raise CheckpointError(
                f"{run_dir / CHECKPOINT_DIR}: no checkpoint in this run directory"
            )
        checkpoint, state = latest
    else:
        state = load_checkpoint(checkpoint, map_location)
    model = create_model(
        config["model_name"],
        num_classes=config["num_classes"],
        in_channels=config["in_channels"],
        **config.get("model_kwargs", {}),
    )
    has_ema = state.get("ema") is not None
    if use_ema and not has_ema:
        raise CheckpointError(f"{checkpoint}: holds no EMA weights (the run had no --ema-decay)")
    used_ema = bool(has_ema and use_ema is not False)
    try:
        model.load_state_dict(state["ema" if used_ema else "model"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"{checkpoint}: weights do not fit model {config['model_name']!r} ({exc})"
        ) from None
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return LoadedRun(model, config, run_dir, checkpoint, state, used_ema)
