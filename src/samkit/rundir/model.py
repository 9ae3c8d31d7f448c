"""A run's model, rebuilt from ``config.json`` and loaded from ``checkpoints/``.

``config.json`` holds at least ``model_name``, ``num_classes``, ``in_channels`` and ``dataset``
(optionally ``model_kwargs``); a checkpoint (:mod:`samkit.rundir.checkpoint`) holds the model's
``state_dict`` under ``"model"`` and, for runs with ``--ema-decay``, the averaged weights under
``"ema"`` (``load_run_model(..., use_ema=...)`` picks them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from samkit.models import MAX_PARAMETERS, count_parameters, create_model, model_name_problem
from samkit.rundir.checkpoint import CheckpointError, load_checkpoint, load_latest_checkpoint
from samkit.rundir.layout import CHECKPOINT_DIR, CONFIG_FILE, read_config, resolve_run

__all__ = ["LoadedRun", "check_run_config", "load_run_model"]


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
    check_run_config(config, run_dir / CONFIG_FILE)
    name, kwargs = config["model_name"], config.get("model_kwargs") or {}
    shape = {"num_classes": config["num_classes"], "in_channels": config["in_channels"]}
    _check_size(name, shape, kwargs, run_dir / CONFIG_FILE)
    if checkpoint is None:
        latest = load_latest_checkpoint(run_dir / CHECKPOINT_DIR, map_location)
        if latest is None:
            raise CheckpointError(
                f"{run_dir / CHECKPOINT_DIR}: no checkpoint in this run directory"
            )
        checkpoint, state = latest
    else:
        state = load_checkpoint(checkpoint, map_location)
    try:
        model = create_model(name, **shape, **kwargs)
    except Exception as exc:  # a hand-edited config: unknown keyword, wrong type or value, ...
        raise ValueError(
            f"{run_dir / CONFIG_FILE}: cannot build model {name!r} with model_kwargs "
            f"{kwargs!r} ({type(exc).__name__}: {_one_line(exc)})"
        ) from None
    has_ema = state.get("ema") is not None
    if use_ema and not has_ema:
        raise CheckpointError(f"{checkpoint}: holds no EMA weights (the run had no --ema-decay)")
    used_ema = bool(has_ema and use_ema is not False)
    weights = state.get("ema" if used_ema else "model")
    problem = _fit_problem(model, weights)
    if problem is None:
        try:
            model.load_state_dict(weights)
        except (KeyError, RuntimeError, TypeError, ValueError, AttributeError) as exc:
            problem = _one_line(exc)
    if problem is not None:
        raise CheckpointError(f"{checkpoint}: weights do not fit model {name!r}: {problem}")
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return LoadedRun(model, config, run_dir, checkpoint, state, used_ema)


#: Upper bounds of the model's shape in config.json (ImageNet-21k has 21,841 classes).
_SHAPE_LIMITS = {"num_classes": 1_000_000, "in_channels": 1024}


def check_run_config(config: Mapping[str, Any], path: Path) -> None:
    """``ValueError`` naming ``path`` (the run's config.json) and the field when a field that
    rebuilds the run's model or finds its data is missing or of the wrong type or range (a
    config.json edited by hand, or written by something else)."""
    missing = [k for k in ("model_name", "num_classes", "in_channels") if k not in config]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    name = config["model_name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}: field 'model_name' is {name!r}, expected a model name")
    for key, high in _SHAPE_LIMITS.items():
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise ValueError(
                f"{path}: field {key!r} is {value!r}, expected an integer in [1, {high}]"
            )
    kwargs = config.get("model_kwargs")
    if kwargs is not None and (
        not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs)
    ):
        raise ValueError(
            f"{path}: field 'model_kwargs' is {kwargs!r}, expected an object of keyword arguments"
        )
    for key in ("dataset", "data_dir"):
        value = config.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{path}: field {key!r} is {value!r}, expected a string")


def _check_size(name: str, shape: dict[str, int], kwargs: dict[str, Any], path: Path) -> None:
    """Refuse, before allocating it, a model larger than samkit builds (counted on the meta
    device), and an unknown model name."""
    problem = model_name_problem(name)
    if problem is not None:
        raise ValueError(f"{path}: field 'model_name': {problem}")
    try:
        count = count_parameters(name, **shape, **kwargs)
    except ValueError:  # bad model_kwargs: building the model says what is wrong
        return
    if count is not None and count > MAX_PARAMETERS:
        raise ValueError(
            f"{path}: model {name!r} (model_kwargs {kwargs!r}) has {count:,} parameters, more "
            f"than samkit builds ({MAX_PARAMETERS:,})"
        )


def _fit_problem(model: nn.Module, weights: Any) -> str | None:
    """What keeps ``weights`` from loading into ``model``, in one line (None if they fit):
    how many keys are missing, unexpected or of another shape, and the first of each."""
    if not isinstance(weights, Mapping):
        return f"no state_dict in the checkpoint (found {type(weights).__name__})"
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    mismatched = [
        k
        for k in expected
        if k in weights
        and isinstance(weights[k], torch.Tensor)
        and weights[k].shape != expected[k].shape
    ]
    parts = []
    for keys, what in ((missing, "missing"), (unexpected, "unexpected")):
        if keys:
            named = ", ".join(repr(k) for k in keys[:2]) + (", ..." if len(keys) > 2 else "")
            parts.append(f"{len(keys)} {what} key(s) ({named})")
    if mismatched:
        k = mismatched[0]
        parts.append(
            f"{len(mismatched)} of another shape ({k!r}: {list(weights[k].shape)} in the file, "
            f"{list(expected[k].shape)} in the model)"
        )
    return "; ".join(parts) or None


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line, cut short (load_state_dict's lists every key)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
