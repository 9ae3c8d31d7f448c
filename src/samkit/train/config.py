"""Settings of a training run; free of heavy imports so that the CLI starts fast."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["TrainConfig"]


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run (the defaults are those of ``samkit train``)."""

    epochs: int = 12
    batch_size: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    sam_rho: float = 0.05
    model: str = "resnet_small"
    augment: bool = False
    data_dir: str | None = None
    output_dir: str = "runs"
    device: str = "cpu"
    train_subset: int | None = None
    run_seed: int = 0
    eval_batch_size: int = 1000
    threads: int | None = None  # torch.set_num_threads; None keeps torch's default
    tensorboard: bool = True
    progress: bool | None = None  # None: a progress bar only on a terminal

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
