"""``--bootstrap-from``: relabel the training set with a finished run's predictions (SAM paper,
Table 4: train, relabel the training set with the model's predictions, retrain from scratch)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from samkit.data import bootstrap_labels, make_loader
from samkit.rundir import SUMMARY_FILE, load_run_model
from samkit.train.build import Data, memory_format_for
from samkit.train.errors import ConfigError

__all__ = ["relabel_from_run"]


def relabel_from_run(
    source: str | Path,
    data: Data,
    device: torch.device,
    *,
    workers: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[Any, dict[str, Any]]:
    """``(relabelled training set, record for bootstrap.json)``: the labels are the predictions
    of ``source``'s model (its EMA weights if it kept them) on the unaugmented training images."""
    source = Path(source)
    try:
        loaded = load_run_model(source, map_location=device, use_ema=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--bootstrap-from {source}: {exc}") from None
    theirs = (loaded.config.get("num_classes"), loaded.config.get("in_channels"))
    ours = (data.info.num_classes, data.info.in_channels)
    if theirs != ours:
        raise ConfigError(
            f"--bootstrap-from {source}: that run's model has {theirs[0]} classes and "
            f"{theirs[1]} input channels; {data.info.name} needs {ours[0]} and {ours[1]}"
        )
    if not (loaded.run_dir / SUMMARY_FILE).is_file():
        log(f"note: {loaded.run_dir} has no {SUMMARY_FILE}; it may not have finished")
    memory_format = memory_format_for(device)
    model = loaded.model.to(memory_format=memory_format)
    loader = make_loader(
        data.train, data.eval_batch_size, train=False, workers=workers, device=device
    )
    predictions = []
    with torch.inference_mode():
        model.eval()
        for x, _ in loader:
            predictions.append(model(x.contiguous(memory_format=memory_format)).argmax(1))
    labels = bootstrap_labels(torch.cat(predictions).cpu(), data.info.num_classes)
    original = data.train.labels
    record = {
        "source_run": str(loaded.run_dir),
        "checkpoint": str(loaded.checkpoint_path),
        "weights": "ema" if loaded.state.get("ema") is not None else "model",
        "num_examples": int(labels.numel()),
        "num_changed": int((labels != original).sum()),
        "agreement_with_original_labels": float((labels == original).double().mean()),
    }
    log(
        f"bootstrap: relabelled {labels.numel():,} training images with the predictions of "
        f"{loaded.run_dir} ({record['num_changed']:,} labels changed)"
    )
    return data.train.with_labels(labels), record
