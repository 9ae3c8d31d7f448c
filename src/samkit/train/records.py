"""What a training run reports: its per-epoch records, the summary, config.json's extra facts
and TensorBoard scalars. The keys are the run-directory format's (:mod:`samkit.rundir.layout`)."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from samkit._version import samkit_version
from samkit.rundir import layout as keys
from samkit.train.errors import TrainingDivergedError
from samkit.train.state import RunState

__all__ = [
    "Scalars",
    "add_evaluation",
    "device_info",
    "epoch_record",
    "progress_line",
    "summary",
    "versions",
]


def versions() -> dict[str, str]:
    return {
        "samkit": samkit_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "num_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["cuda_device_name"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    else:
        info["cpu"] = cpu_model()
        info["cpu_count"] = os.cpu_count()
    return info


def cpu_model() -> str:
    """The CPU's model name (``AMD EPYC 9B14``), from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Scalars:
    """TensorBoard scalars, if tensorboard is installed and enabled; a no-op otherwise."""

    def __init__(
        self, enabled: bool, log_dir: Path, log: Callable[[str], None], purge_step: int | None
    ):
        self.writer = None
        if not enabled:
            return
        try:  # optional: imported only when scalars are written
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("note: tensorboard is not installed; no TensorBoard scalars are written")
            return
        # purge_step hides the events a killed process logged after its last checkpoint.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def add(self, values: dict[str, Any], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(key, value, step)

    def add_record(self, record: dict[str, Any], step: int) -> None:
        """The record's metrics that TensorBoard shows (the seed system's names)."""
        self.add({k: record[k] for k in keys.TENSORBOARD_SCALARS if k in record}, step)

    def close(self) -> None:
        # A closed SummaryWriter silently opens a new event file on the next add_scalar (and
        # nothing closes that one): later scalars are dropped instead.
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def epoch_record(
    state: RunState, model: nn.Module, learning_rate: float, skipped_steps: int, partial: bool
) -> dict[str, Any]:
    """The metrics.jsonl record of the epoch in progress (without its evaluation)."""
    stats = state.stats
    if stats.seen == 0 or not math.isfinite(stats.loss_sum.item()):
        raise TrainingDivergedError(
            f"training diverged in epoch {state.epoch + 1}: every step had a non-finite loss "
            "or gradient; try a smaller --learning-rate"
        )
    with torch.no_grad():
        param_norm = torch.linalg.vector_norm(
            torch.stack([p.detach().float().norm(2) for p in model.parameters()])
        ).item()
    record: dict[str, Any] = {
        keys.EPOCH: state.epoch + 1,
        keys.STEP: state.global_step,
        keys.LEARNING_RATE: learning_rate,
        keys.TRAIN_LOSS: stats.loss_sum.item() / stats.seen,
        keys.TRAIN_ERROR_RATE: stats.wrong_sum.item() / stats.seen,
        keys.GRADIENT_NORM: stats.grad_norm_sum.item() / max(1, stats.grad_norm_count),
        keys.PARAM_NORM: param_norm,
        keys.SKIPPED_STEPS: skipped_steps,
        keys.EPOCH_SECONDS: stats.seconds,
        keys.IMAGES_PER_SEC: stats.seen / stats.seconds if stats.seconds > 0 else None,
    }
    if partial:
        record[keys.PARTIAL_EPOCH] = True
    return record


def add_evaluation(record: dict[str, Any], result: dict[str, Any]) -> None:
    """Put an :func:`~samkit.train.evaluate.evaluate_model` result into ``record``."""
    record[keys.TEST_LOSS] = result["loss"]
    record[keys.TEST_ERROR_RATE] = result["error_rate"]
    record[keys.TEST_ACCURACY] = result["accuracy"]
    if "top_5_error_rate" in result:
        record[keys.TEST_TOP_5_ERROR_RATE] = result["top_5_error_rate"]


def progress_line(record: dict[str, Any], num_epochs: int) -> str:
    """``epoch   3/12  train loss ... err ...  test loss ... err ...  (25s, 1100 img/s)``."""
    text = (
        f"epoch {record[keys.EPOCH]:>3}/{num_epochs}"
        f"{' (partial)' if record.get(keys.PARTIAL_EPOCH) else ''}  "
        f"train loss {record[keys.TRAIN_LOSS]:.4f} err {record[keys.TRAIN_ERROR_RATE]:.2%}"
    )
    if keys.TEST_LOSS in record:
        text += f"  test loss {record[keys.TEST_LOSS]:.4f} err {record[keys.TEST_ERROR_RATE]:.2%}"
    if record[keys.IMAGES_PER_SEC]:
        text += f"  ({record[keys.EPOCH_SECONDS]:.0f}s, {record[keys.IMAGES_PER_SEC]:.0f} img/s)"
    return text


def summary(
    state: RunState,
    final: dict[str, Any],
    partial: dict[str, Any] | None,
    *,
    status: str,
    config: dict[str, Any],
    run_dir: Path,
    model_name: str,
    num_parameters: int,
    optimizer: str,
    skipped_steps: int,
    use_test_set: bool,
    wall_seconds: float,
    device: torch.device,
) -> dict[str, Any]:
    """summary.json: the final and best evaluations (a ``partial`` epoch counts among them) and
    the run's totals."""
    evaluated = [r for r in state.history if keys.TEST_ERROR_RATE in r]
    best = min(
        evaluated + ([partial] if partial else []),
        key=lambda r: r[keys.TEST_ERROR_RATE],
        default=final,
    )
    train_seconds = state.train_seconds + (partial[keys.EPOCH_SECONDS] if partial else 0.0)
    out: dict[str, Any] = {
        keys.STATUS: status,
        "config": config,
        "run_dir": str(run_dir),
        "dataset": config["dataset"],
        "model": model_name,
        "num_parameters": num_parameters,
        "optimizer": optimizer,
        "epochs_completed": len(state.history),
        "steps": state.global_step,
        keys.SKIPPED_STEPS: skipped_steps,
        "eval_split": "test" if use_test_set else "holdout",
        keys.FINAL_TEST_ERROR_RATE: final[keys.TEST_ERROR_RATE],
        keys.FINAL_TEST_ACCURACY: final[keys.TEST_ACCURACY],
        keys.FINAL_TEST_LOSS: final[keys.TEST_LOSS],
        keys.BEST_TEST_ERROR_RATE: best[keys.TEST_ERROR_RATE],
        keys.BEST_TEST_ACCURACY: best[keys.TEST_ACCURACY],
        "best_epoch": best.get(keys.EPOCH),
        keys.TRAIN_SECONDS: train_seconds,
        keys.EVAL_SECONDS: state.eval_seconds,
        "images_trained": state.images_trained,
        keys.IMAGES_PER_SEC: state.images_trained / train_seconds if train_seconds > 0 else None,
        keys.WALL_SECONDS: wall_seconds,
        "resumed_from": str(state.resumed_from) if state.resumed_from else None,
        "device": str(device),
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    if keys.TEST_TOP_5_ERROR_RATE in final:
        out[keys.FINAL_TEST_TOP_5_ERROR_RATE] = final[keys.TEST_TOP_5_ERROR_RATE]
        out[keys.BEST_TEST_TOP_5_ERROR_RATE] = min(
            r.get(keys.TEST_TOP_5_ERROR_RATE, 1.0) for r in evaluated + [final]
        )
    return out
