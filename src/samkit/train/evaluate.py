"""Evaluation: a model over a data loader (:func:`evaluate_model`, used after every epoch of
training), and ``samkit evaluate``'s re-evaluation of a run's checkpoint (:func:`evaluate_run`).

For :func:`evaluate_run` the model is rebuilt from the run's ``config.json`` and the data are
prepared exactly as the training loop prepared its evaluation split (same data set, holdout
seed, batch size, memory format and, unless told otherwise, thread count), so evaluating a
finished run's last checkpoint reproduces the run's final test error.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from samkit.data import build_datasets, make_loader
from samkit.rundir import CONFIG_FILE, load_run_model, read_config, resolve_run
from samkit.train.build import HOLDOUT_SEED, eval_batch_size, memory_format_for
from samkit.train.checks import check_value
from samkit.train.config import settings
from samkit.train.errors import ConfigError, TrainingDivergedError

__all__ = ["evaluate_model", "evaluate_run"]


@torch.inference_mode()
def evaluate_model(
    model: nn.Module,
    loader: Any,
    memory_format: torch.memory_format = torch.contiguous_format,
    top5: bool = False,
    all_reduce: bool = False,
) -> dict[str, float]:
    """Cross-entropy, error rate (and top-5 error rate) of ``model`` over ``loader``.

    ``all_reduce``: every process of the initialised process group evaluated its own shard; the
    sums (loss, errors, count) are added up across processes so every process returns the result
    over the union of the shards."""
    model.eval()
    total_loss, wrong, wrong5, count = 0.0, 0, 0, 0
    for x, y in loader:
        logits = model(x.contiguous(memory_format=memory_format)).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        wrong += (logits.argmax(1) != y).sum().item()
        if top5:
            k = min(5, logits.shape[1])
            wrong5 += (~(logits.topk(k, dim=1).indices == y[:, None]).any(1)).sum().item()
        count += y.numel()
    if all_reduce:
        device = next(model.parameters()).device
        sums = torch.tensor([total_loss, wrong, wrong5, count], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums)
        total_loss = sums[0].item()
        wrong, wrong5, count = (int(round(v)) for v in sums[1:].tolist())
    n = max(1, count)
    out = {
        "loss": total_loss / n,
        "error_rate": wrong / n,
        "accuracy": 1.0 - wrong / n,
        "num_examples": count,
    }
    if top5:
        out["top_5_error_rate"] = wrong5 / n
    return out


def evaluate_run(
    path: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    split: str = "test",
    top5: bool | None = None,
    batch_size: int | None = None,
    weights: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
) -> dict[str, Any]:
    """Evaluate a run directory's latest good checkpoint (or the checkpoint file ``path``).

    Raises :class:`TrainingDivergedError` when the weights, or the loss, are not finite.

    ``weights``: ``"auto"`` uses the EMA weights when the run kept them (they are what the run
    evaluated), ``"ema"`` requires them, ``"model"`` uses the trained weights.
    """
    if split not in ("test", "holdout"):
        raise ValueError(f"split must be 'test' or 'holdout', not {split!r}")
    if weights not in ("auto", "ema", "model"):
        raise ValueError(f"weights must be auto, ema or model, not {weights!r}")
    run_dir, _ = resolve_run(path)
    config = read_config(run_dir)
    if "dataset" not in config:
        raise ValueError(f"{run_dir / CONFIG_FILE}: no 'dataset'; cannot rebuild the data")
    _check_config(config, run_dir / CONFIG_FILE)
    threads_before = torch.get_num_threads()
    threads = threads if threads is not None else config.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    try:
        dev = torch.device(device)
        use_ema = {"auto": None, "ema": True, "model": False}[weights]
        loaded = load_run_model(path, map_location=dev, use_ema=use_ema)
        _, eval_ds, info = build_datasets(
            config["dataset"],
            data_dir=data_dir if data_dir is not None else config.get("data_dir"),
            use_test_set=split == "test",
            holdout_fraction=config.get("holdout_fraction", 0.1),
            seed=config.get("run_seed", 0),
            holdout_seed=config.get("holdout_seed", HOLDOUT_SEED),
            image_level="none",
            image_size=config.get("image_size"),
        )
        if info.num_classes != config.get("num_classes"):
            raise ValueError(
                f"the data have {info.num_classes} classes, the run's model "
                f"{config.get('num_classes')}"
            )
        if batch_size is None:
            batch_size = config.get("eval_batch_size_resolved") or eval_batch_size(
                config.get("eval_batch_size"), config.get("batch_size", 128), info.in_memory
            )
        if top5 is None:
            top5 = bool(config.get("compute_top_5_error_rate", False))
        memory_format = memory_format_for(dev)
        model = loaded.model.to(device=dev, memory_format=memory_format)
        values = [t for t in model.state_dict().values() if t.is_floating_point()]
        bad = sum(int((~torch.isfinite(t)).sum()) for t in values)
        if bad:
            raise TrainingDivergedError(
                f"{loaded.checkpoint_path}: {bad:,} of the {sum(t.numel() for t in values):,} "
                f"{'EMA ' if loaded.used_ema else ''}weights and buffers are not finite (the run "
                "diverged); there is nothing to evaluate"
            )
        loader = make_loader(
            eval_ds, batch_size, train=False, workers=int(config.get("workers", 0)), device=dev
        )
        result = evaluate_model(model, loader, memory_format, top5)
        if not math.isfinite(result["loss"]):
            raise TrainingDivergedError(
                f"{loaded.checkpoint_path}: the evaluation loss is {result['loss']} although the "
                "weights are finite (the model's outputs overflow)"
            )
    finally:
        torch.set_num_threads(threads_before)
    state = loaded.state
    out: dict[str, Any] = {
        "run_dir": str(loaded.run_dir),
        "checkpoint": str(loaded.checkpoint_path),
        "weights": "ema" if loaded.used_ema else "model",
        "epoch": state.get("epoch"),
        "step": state.get("global_step"),
        "dataset": config["dataset"],
        "split": split,
        "num_examples": result["num_examples"],
        "test_error_rate": result["error_rate"],
        "test_accuracy": result["accuracy"],
        "test_loss": result["loss"],
    }
    if "top_5_error_rate" in result:
        out["test_top_5_error_rate"] = result["top_5_error_rate"]
    return out


#: The settings in config.json that rebuild the evaluation data (checked against their domains:
#: a config.json edited by hand must fail naming the field, not deep in the data loader).
_DATA_SETTINGS = (
    "dataset",
    "data_dir",
    "holdout_fraction",
    "run_seed",
    "image_size",
    "batch_size",
    "eval_batch_size",
    "compute_top_5_error_rate",
    "threads",
    "workers",
)


def _check_config(config: dict[str, Any], path: Path) -> None:
    fields = {f.name: f for f in settings()}
    for key in _DATA_SETTINGS:
        if key in config:
            try:
                check_value(fields[key], config[key])
            except ConfigError as exc:  # "--flag: 'x' is not ...": name the field instead
                raise ValueError(f"{path}: field {key!r}: {str(exc).split(': ', 1)[-1]}") from None
    for key in ("holdout_seed", "eval_batch_size_resolved"):  # written by samkit, not settings
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{path}: field {key!r} is {value!r}, expected an integer")
