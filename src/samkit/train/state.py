"""Where a run stands: position in the data order, running sums of the epoch, the metric history
and the timers. Everything here goes into checkpoints, so that a resumed run continues exactly."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["EpochStats", "RunState", "rng_state", "set_rng_state"]


class EpochStats:
    """Running sums of one epoch's training metrics (kept in checkpoints for mid-epoch resume)."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.wrong_sum = torch.zeros((), dtype=torch.long, device=device)
        self.grad_norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.grad_norm_count = 0
        self.seen = 0
        self.seconds = 0.0

    def add(
        self, n: int, loss_sum: torch.Tensor, wrong: torch.Tensor, grad_norm: torch.Tensor | None
    ) -> None:
        """Count a step taken on ``n`` examples (sums over them; the step's gradient norm)."""
        self.seen += n
        self.loss_sum += loss_sum
        self.wrong_sum += wrong
        if grad_norm is not None:
            self.grad_norm_sum += grad_norm.double()
            self.grad_norm_count += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_sum": self.loss_sum,
            "wrong_sum": self.wrong_sum,
            "grad_norm_sum": self.grad_norm_sum,
            "grad_norm_count": self.grad_norm_count,
            "seen": self.seen,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum.copy_(state["loss_sum"])
        self.wrong_sum.copy_(state["wrong_sum"])
        self.grad_norm_sum.copy_(state["grad_norm_sum"])
        self.grad_norm_count = int(state["grad_norm_count"])
        self.seen = int(state["seen"])
        self.seconds = float(state["seconds"])


class RunState:
    """The run's progress: ``epoch`` (0-based, in progress), ``batch`` (next within it),
    ``global_step``, the epoch's :class:`EpochStats`, the per-epoch ``history`` records, the
    training / evaluation seconds and the images trained on. ``resumed_from`` is not saved."""

    def __init__(self, device: torch.device):
        self.device = device
        self.epoch = 0
        self.batch = 0
        self.global_step = 0
        self.stats = EpochStats(device)
        self.history: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.images_trained = 0
        self.wall_seconds_before = 0.0
        self.resumed_from: Path | None = None

    def next_epoch(self) -> None:
        """Close the epoch: its training time counts, the next starts at batch 0."""
        self.train_seconds += self.stats.seconds
        self.epoch += 1
        self.batch = 0
        self.stats = EpochStats(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "global_step": self.global_step,
            "epoch_stats": self.stats.state_dict(),
            "history": self.history,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "images_trained": self.images_trained,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["epoch_stats"])
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.train_seconds = float(state["train_seconds"])
        self.eval_seconds = float(state["eval_seconds"])
        self.images_trained = int(state["images_trained"])
        # written by run.checkpoint_state (the live value); older checkpoints have none: 0
        self.wall_seconds_before = float(state.get("wall_seconds", 0.0))


def rng_state(device: torch.device) -> dict[str, Any]:
    """The torch, Python and NumPy random states (and the device's), as checkpointable tensors."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
