"""``samkit evaluate``: re-evaluate a training run's checkpoint.

The model is rebuilt from the run's ``config.json`` and the data are prepared exactly as the
training loop prepared its evaluation split (same data set, holdout seed, batch size, memory
format and, unless told otherwise, thread count), so evaluating a finished run's last checkpoint
reproduces the run's final test error.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["evaluate_run"]


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

    ``weights``: ``"auto"`` uses the EMA weights when the run kept them (they are what the run
    evaluated), ``"ema"`` requires them, ``"model"`` uses the trained weights.
    """
    from samkit.data import build_datasets, make_loader
    from samkit.train.loop import (
        HOLDOUT_SEED,
        default_eval_batch_size,
        evaluate_model,
        memory_format_for,
    )
    from samkit.train.run import load_run_model, read_config, resolve_run

    if split not in ("test", "holdout"):
        raise ValueError(f"split must be 'test' or 'holdout', not {split!r}")
    if weights not in ("auto", "ema", "model"):
        raise ValueError(f"weights must be auto, ema or model, not {weights!r}")
    run_dir, _ = resolve_run(path)
    config = read_config(run_dir)
    if "dataset" not in config:
        raise ValueError(f"{run_dir / 'config.json'}: no 'dataset'; cannot rebuild the data")
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
            batch_size = config.get("eval_batch_size_resolved") or default_eval_batch_size(
                _Cfg(config.get("eval_batch_size"), config.get("batch_size", 128)),
                info.in_memory,
            )
        if top5 is None:
            top5 = bool(config.get("compute_top_5_error_rate", False))
        memory_format = memory_format_for(dev)
        model = loaded.model.to(device=dev, memory_format=memory_format)
        loader = make_loader(
            eval_ds, batch_size, train=False, workers=int(config.get("workers", 0)), device=dev
        )
        result = evaluate_model(model, loader, memory_format, top5)
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


class _Cfg:
    """The two fields default_eval_batch_size reads."""

    def __init__(self, eval_batch_size: int | None, batch_size: int):
        self.eval_batch_size, self.batch_size = eval_batch_size, batch_size
