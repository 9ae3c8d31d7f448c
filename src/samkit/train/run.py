"""A run directory as other commands see it: ``config.json`` plus ``checkpoints/``.

The contract with ``samkit train``: ``config.json`` holds every resolved setting, at least
``model_name``, ``num_classes``, ``in_channels`` and ``dataset`` (optionally ``model_kwargs``);
``checkpoints/`` holds files written by ``samkit.train.checkpoint.save_checkpoint`` whose state has
the model's ``state_dict`` under ``"model"`` (and, for runs with ``--ema-decay``, the averaged
weights under ``"ema"``; ``load_run_model(..., use_ema=...)`` picks them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from samkit.train.checkpoint import CheckpointError, load_checkpoint, load_latest_checkpoint

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


@dataclass
class LoadedRun:
    model: nn.Module
    config: dict[str, Any]
    run_dir: Path
    checkpoint_path: Path
    state: dict[str, Any]
    used_ema: bool = False


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``run_dir/config.json`` as a dict; a clear error when missing or not valid JSON."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no config.json; is {run_dir} a samkit run directory?"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: corrupt config.json ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


def resolve_run(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(run_dir, checkpoint file or None for 'the latest')`` from a run dir or a checkpoint."""
    path = Path(path)
    if path.is_dir():
        return path, None
    if path.is_file():
        parent = path.parent
        return (parent.parent if parent.name == CHECKPOINT_DIR else parent), path
    raise FileNotFoundError(f"{path}: no such run directory or checkpoint file")


def load_run_model(
    path: str | os.PathLike, map_location: Any = "cpu", *, use_ema: bool | None = False
) -> LoadedRun:
    """Rebuild a run's model from its config and load the given (or latest good) checkpoint.

    ``use_ema``: False loads the trained weights (``"model"``); True the exponential moving
    average (``"ema"``, an error if the run kept none); None the EMA if present, else the model.
    """
    from samkit.models import create_model  # models import torchvision lazily; keep this light

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
