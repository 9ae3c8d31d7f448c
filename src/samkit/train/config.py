"""Settings of a training run; free of heavy imports so that the CLI starts fast.

The defaults are those of ``samkit train`` with no flags: the Fashion-MNIST CPU main job. Where
they differ from the seed system's (google-research/sam) defaults, :data:`SEED_DEFAULTS` records
the seed's value; ``docs/train.md`` explains each difference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["RESUME_IGNORED", "SEED_DEFAULTS", "TrainConfig"]


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run (the defaults are those of ``samkit train``)."""

    # What is trained
    dataset: str = "fashion_mnist"
    model_name: str = "resnet_small"
    num_epochs: int = 12
    batch_size: int = 128
    # Optimisation
    learning_rate: float = 0.1  # peak; cosine decay to 0 over all steps, updated every step
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    weight_decay_mode: str = "decoupled"  # "loss": 0.5 * wd * ||w||^2 in the loss (the seed)
    gradient_clipping: float | None = None  # global norm of the (SAM) gradient; None: off
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # EMA of the weights, evaluated (and checkpointed) when > 0
    optimizer: str = "sam"  # sgd | sam | esam; rho 0 with sam / esam trains with plain SGD
    sam_rho: float = 0.05
    sam_m: int | None = None  # m-sharpness: per-chunk perturbations of m samples
    sam_adaptive: bool = False  # ASAM
    esam_beta: float = 0.5
    esam_gamma: float = 0.5
    esam_criterion: str = "sharpness"
    amp: str = "none"  # none | bf16 | fp16
    sync_perturbations: bool = False  # torchrun: perturb with the global batch's gradient
    sync_bn: bool = False  # torchrun: SyncBatchNorm (CUDA only); no effect in one process
    run_seed: int = 0
    # Data
    use_test_set: bool = True  # False: evaluate on a 10% holdout of the training set
    holdout_fraction: float = 0.1
    image_level_augmentations: str = "none"
    batch_level_augmentations: str = "none"
    cutout_length: int = 16
    image_size: int | None = None  # crop size of image folders (default 224)
    label_noise: float = 0.0
    bootstrap_from: str | None = None
    train_subset: int | None = None
    data_dir: str | None = None
    workers: int = 0
    # Fine-tuning
    from_pretrained_checkpoint: bool = False
    pretrained_checkpoint: str | None = None
    freeze_bn_stats: bool = False
    # Evaluation
    evaluate_every: int = 1  # epochs; the last epoch is always evaluated
    compute_top_5_error_rate: bool = False
    eval_batch_size: int | None = None  # None: 1000 for in-memory data sets, else batch_size
    # Outputs, checkpoints, machine
    output_dir: str = "runs"
    run_dir: str | None = None  # overrides output_dir/lr_{lr}/wd_{wd}/rho_{rho}/seed_{seed}
    save_progress_seconds: float = 3600.0
    resume: bool = True
    max_steps: int | None = None  # stop after this many steps in total (smoke tests)
    device: str = "cpu"
    threads: int | None = None  # torch.set_num_threads; None keeps torch's default
    tensorboard: bool = True
    progress: bool | None = None  # None: a progress bar only on a terminal
    dist_timeout: float = 1800.0  # torchrun: seconds a collective may wait for the other ranks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def sharpness_aware(self) -> bool:
        """True when the run takes SAM / ESAM steps (rho > 0 with a sharpness-aware optimizer)."""
        return self.optimizer in ("sam", "esam") and self.sam_rho > 0

    @property
    def effective_rho(self) -> float:
        return self.sam_rho if self.sharpness_aware else 0.0


#: The seed system's defaults where ours differ (flag -> seed default).
SEED_DEFAULTS: dict[str, Any] = {
    "dataset": "cifar10",
    "model_name": "WideResnet28x10",
    "num_epochs": 200,
    "weight_decay": 0.001,
    "weight_decay_mode": "loss",
    "gradient_clipping": 5.0,
    "sam_rho": 0.0,
    "image_level_augmentations": "basic",
}

#: Settings that may change when a run is resumed: they do not change what is trained.
RESUME_IGNORED = frozenset(
    {
        "data_dir",
        "workers",
        "output_dir",
        "run_dir",
        "save_progress_seconds",
        "resume",
        "max_steps",
        "device",
        "threads",
        "tensorboard",
        "progress",
        "dist_timeout",
        "evaluate_every",
        "compute_top_5_error_rate",
        "eval_batch_size",
    }
)
