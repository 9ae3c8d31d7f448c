"""Everything a training run is made of, built from its :class:`TrainConfig`: data, model,
optimizer, loss and the training step. Each builder is a function of the config (plus the device
and, under torchrun, the process group's shape), so each can be called and tested alone.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samkit.data import build_datasets, make_loader
from samkit.data.common import DataFormatError
from samkit.models import create_model, freeze_batchnorm_statistics, load_pretrained
from samkit.optim import create_optimizer, get_optimizer_info
from samkit.rundir import nested_run_dir
from samkit.train import distributed
from samkit.train.config import TrainConfig
from samkit.train.errors import ConfigError
from samkit.train.schedule import CosineSchedule
from samkit.train.step import AMP_DTYPES, SharpnessAwareStep
from samkit.train.trajectory import TrajectoryLoss, create_trajectory_loss, needs_indices

__all__ = [
    "HOLDOUT_SEED",
    "Data",
    "build_data",
    "build_loaders",
    "build_loss",
    "build_model",
    "base_optimizer",
    "build_optimizer",
    "build_schedule",
    "build_step",
    "build_trajectory",
    "describe_optimizer",
    "device_for",
    "eval_batch_size",
    "memory_format_for",
    "resolve_paths",
    "run_dir_for",
    "warmup_steps",
]

#: How run labels name the base optimizers (``--base-optimizer``).
BASE_NAMES = {"sgd": "SGD", "adamw": "AdamW"}

#: The holdout (``use_test_set=False``) is drawn with this seed whatever ``run_seed`` is, so
#: that runs with different seeds are compared on the same validation images.
HOLDOUT_SEED = 0

Log = Callable[[str], None]


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Absolute paths, so that a run's config names the same files from anywhere."""
    cfg = copy.copy(cfg)
    for name in ("data_dir", "bootstrap_from", "pretrained_checkpoint", "run_dir"):
        value = getattr(cfg, name)
        if value is not None:
            setattr(cfg, name, str(Path(value).expanduser().absolute()))
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().absolute())
    return cfg


def run_dir_for(cfg: TrainConfig) -> Path:
    """``cfg.run_dir`` if given, else ``output_dir/lr_{lr}/wd_{wd}/rho_{rho}/seed_{seed}`` (the
    seed system's layout; rho is 0 for plain SGD)."""
    if cfg.run_dir is not None:
        return Path(cfg.run_dir)
    return nested_run_dir(
        cfg.output_dir, cfg.learning_rate, cfg.weight_decay, cfg.effective_rho, cfg.run_seed
    )


def device_for(cfg: TrainConfig, dist: distributed.DistInfo | None) -> torch.device:
    """``--device``; under torchrun a bare ``cuda`` means ``cuda:LOCAL_RANK``."""
    device = torch.device(cfg.device)
    if dist is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    return device


def amp_for(cfg: TrainConfig, device: torch.device, dist: distributed.DistInfo | None) -> str:
    """``--amp``, with ``auto`` resolved: ``bf16`` where ``device`` computes bf16 natively (on
    every process, under torchrun), else ``none`` (float32)."""
    if cfg.amp != "auto":
        return cfg.amp
    native = native_bf16(device)
    if dist is not None:  # one precision for all replicas, or their weights would drift apart
        flag = torch.tensor([1.0 if native else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        native = flag.item() == 1.0
    return "bf16" if native else "none"


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matrix arithmetic runs natively: CUDA GPUs with bf16 (Ampere and later),
    CPUs with AMX or AVX512-BF16 (oneDNN's fast bf16 paths); elsewhere bf16 is emulated and slower
    than float32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence getattr
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def memory_format_for(device: torch.device) -> torch.memory_format:
    # channels_last is markedly faster for convolutions on the CPU (oneDNN).
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def eval_batch_size(requested: int | None, batch_size: int, in_memory: bool) -> int:
    """``--eval-batch-size``, else 1000 for in-memory data sets and the batch size otherwise."""
    if requested is not None:
        return requested
    return 1000 if in_memory else batch_size


def describe_optimizer(cfg: TrainConfig) -> str:
    """``SGD``, ``SAM rho=0.05``, ``ESAM rho=0.05 beta=0.5 gamma=0.5``, plus `` m=M``; over
    AdamW: ``AdamW``, ``SAM rho=0.05 over AdamW``."""
    info = get_optimizer_info(cfg.effective_optimizer)
    if cfg.base_optimizer != "sgd" and info.name == "sgd":
        return BASE_NAMES[cfg.base_optimizer]
    text = info.describe(optimizer_options(cfg))
    if cfg.sharpness_aware and cfg.sam_m:
        text += f" m={cfg.sam_m}"
    if cfg.base_optimizer != "sgd":
        text += f" over {BASE_NAMES[cfg.base_optimizer]}"
    return text


def optimizer_options(cfg: TrainConfig) -> dict[str, Any]:
    """The effective optimizer's options, each read from the setting that sets it."""
    info = get_optimizer_info(cfg.effective_optimizer)
    return {option.name: getattr(cfg, option.flag) for option in info.options}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class Data:
    """The training and evaluation sets, what :func:`samkit.data.build_datasets` says of them,
    and the evaluation batch size."""

    train: Any
    eval: Any
    info: Any
    eval_batch_size: int


def build_data(cfg: TrainConfig, dist: distributed.DistInfo | None = None) -> Data:
    """The data sets of the run; bad settings raise :class:`ConfigError` naming the flag."""
    try:
        train_ds, eval_ds, info = build_datasets(
            cfg.dataset,
            data_dir=cfg.data_dir,
            use_test_set=cfg.use_test_set,
            holdout_fraction=cfg.holdout_fraction,
            seed=cfg.run_seed,
            holdout_seed=HOLDOUT_SEED,
            label_noise=cfg.label_noise,
            train_subset=cfg.train_subset,
            image_level=cfg.image_level_augmentations,
            batch_level=cfg.batch_level_augmentations,
            cutout_length=cfg.cutout_length,
            image_size=cfg.image_size,
        )
    except ValueError as exc:
        if isinstance(exc, DataFormatError):
            raise
        text = str(exc)
        flag = "--train-subset" if "train_subset" in text else "--dataset"
        if "holdout" in text:
            flag = "--use-test-set"
        raise ConfigError(f"{flag}: {text}") from None
    if len(eval_ds) == 0:
        raise ConfigError(f"--dataset {cfg.dataset}: the evaluation split has no examples")
    if len(train_ds) == 0:
        raise ConfigError(f"--dataset {cfg.dataset}: the training split has no examples")
    if dist is not None:
        world = dist.world_size
        if cfg.batch_size % world:
            raise ConfigError(
                f"--batch-size {cfg.batch_size}: the global batch is split evenly across the "
                f"{world} processes (WORLD_SIZE={world}); use a multiple of {world}"
            )
        if len(train_ds) < cfg.batch_size:
            raise ConfigError(
                f"--batch-size {cfg.batch_size}: larger than the training set "
                f"({len(train_ds)} examples); under torchrun every step needs a full batch"
            )
    batch = eval_batch_size(cfg.eval_batch_size, cfg.batch_size, info.in_memory)
    return Data(train_ds, eval_ds, info, batch)


class _ShardView(torch.utils.data.Dataset):
    """The examples ``indices`` of ``dataset`` (keeps ``get(index, train=)``)."""

    def __init__(self, dataset: Any, indices: range):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, index: int, *, train: bool) -> Any:
        get = getattr(self.dataset, "get", None)
        i = self.indices[index]
        return get(i, train=train) if get is not None else self.dataset[i]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]


def build_loaders(
    cfg: TrainConfig, data: Data, device: torch.device, dist: distributed.DistInfo | None = None
) -> tuple[Any, Any]:
    """``(train_loader, eval_loader)``. Under torchrun each rank loads and augments only its rows
    of every global batch (identical to slicing the global batch; see samkit.data.loader) and
    evaluates its own contiguous shard of the evaluation set. With ``--optimizer saf`` the
    training loader yields ``(x, y, index)`` (each sample's index in the training set)."""
    train_loader = make_loader(
        data.train,
        cfg.batch_size,
        train=True,
        seed=cfg.run_seed,
        workers=cfg.workers,
        device=device,
        shard=(dist.rank, dist.world_size) if dist is not None else None,
        indices=needs_indices(cfg.effective_optimizer),
    )
    eval_ds = data.eval
    if dist is not None:
        shard = distributed.eval_shard(len(eval_ds), dist)
        subset = getattr(eval_ds, "subset", None)
        eval_ds = subset(torch.arange(shard.start, shard.stop)) if subset else None
        eval_ds = eval_ds if eval_ds is not None else _ShardView(data.eval, shard)
    eval_loader = make_loader(
        eval_ds, data.eval_batch_size, train=False, workers=cfg.workers, device=device
    )
    return train_loader, eval_loader


# --------------------------------------------------------------------------------------------
# Model, optimizer, loss, step
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def build_model(
    cfg: TrainConfig,
    info: Any,
    device: torch.device,
    dist: distributed.DistInfo | None = None,
    log: Log = print,
) -> tuple[nn.Module, int]:
    """The seeded model on ``device`` (fine-tuned, SyncBatchNorm, frozen BatchNorm statistics as
    asked), and how many BatchNorm layers became SyncBatchNorm."""
    seed_everything(cfg.run_seed, device)
    model = create_model(cfg.model_name, num_classes=info.num_classes, in_channels=info.in_channels)
    if cfg.from_pretrained_checkpoint:
        try:
            report = load_pretrained(model, cfg.pretrained_checkpoint)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--pretrained-checkpoint: {exc}") from None
        head = f"; new head ({', '.join(report.dropped)})" if report.new_head else ""
        if report.adapted:
            head += f"; input channels adapted ({', '.join(report.adapted)})"
        log(
            f"fine-tuning from {cfg.pretrained_checkpoint}: {len(report.loaded)} tensors "
            f"loaded{head}"
        )
    model = model.to(device=device, memory_format=memory_format_for(device))
    sync_bn_layers = 0
    if cfg.sync_bn and dist is not None:  # before freezing: conversion drops BatchNorm hooks
        model, sync_bn_layers = distributed.convert_sync_batchnorm(model)
        log(
            f"--sync-bn: {sync_bn_layers} BatchNorm layers converted to SyncBatchNorm "
            f"(statistics over the global batch of {dist.world_size} processes)"
        )
    elif cfg.sync_bn:
        log("--sync-bn: no effect in a single process (BatchNorm already sees the batch)")
    if cfg.freeze_bn_stats:
        log(f"BatchNorm statistics frozen in {freeze_batchnorm_statistics(model)} layers")
    return model, sync_bn_layers


def base_optimizer(cfg: TrainConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """``--base-optimizer``'s class and its keywords from the run's settings (the weight decay is
    the base optimizer's own with ``--weight-decay-mode decoupled``, else 0)."""
    weight_decay = cfg.weight_decay if cfg.weight_decay_mode == "decoupled" else 0.0
    if cfg.base_optimizer == "adamw":
        betas = (cfg.adamw_beta1, cfg.adamw_beta2)
        return torch.optim.AdamW, dict(
            lr=cfg.learning_rate, betas=betas, eps=cfg.adamw_eps, weight_decay=weight_decay
        )
    sgd = dict(
        lr=cfg.learning_rate,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=weight_decay,
    )
    return torch.optim.SGD, sgd


def build_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """The registry's optimizer (the base optimizer alone when rho is 0) over
    ``--base-optimizer`` with the run's settings.

    ``params``: the model (a method that chooses which parameters to perturb, SAM-ON, builds its
    param groups from it), or its parameters."""
    base, kwargs = base_optimizer(cfg)
    options = optimizer_options(cfg)
    try:
        return create_optimizer(cfg.effective_optimizer, params, base, **options, **kwargs)
    except ValueError as exc:
        if get_optimizer_info(cfg.effective_optimizer).param_groups is None:
            raise
        raise ConfigError(f"--optimizer {cfg.effective_optimizer}: {exc}") from None


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """``--warmup-epochs`` in steps, rounded half up (0.5 epoch of 15 steps: 8)."""
    return int(math.floor(cfg.warmup_epochs * steps_per_epoch + 0.5))


def build_schedule(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> CosineSchedule:
    """The learning-rate schedule over ``--num-epochs``: the warm-up, then the cosine decay."""
    total = cfg.num_epochs * steps_per_epoch
    warmup = min(warmup_steps(cfg, steps_per_epoch), total)
    return CosineSchedule(optimizer, cfg.learning_rate, total, warmup_steps=warmup)


def build_loss(
    cfg: TrainConfig, params: list[torch.Tensor]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-sample cross-entropy (with label smoothing); with ``--weight-decay-mode loss`` plus the
    seed's ``0.5 * wd * ||w||^2``, which then enters the perturbation too."""
    smoothing = cfg.label_smoothing
    l2 = 0.5 * cfg.weight_decay if cfg.weight_decay_mode == "loss" else 0.0

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(outputs, targets, reduction="none", label_smoothing=smoothing)
        if l2:
            losses = losses + l2 * torch.stack([p.square().sum() for p in params]).sum()
        return losses

    return loss_fn


def build_trajectory(
    cfg: TrainConfig, model: nn.Module, data: Data, amp: str
) -> TrajectoryLoss | None:
    """SAF's or MESA's trajectory loss (samkit.train.trajectory) with the run's settings, for the
    resolved ``amp``; None for every other method."""
    num_classes = data.info.num_classes or len(data.info.classes or ())
    return create_trajectory_loss(
        cfg.effective_optimizer,
        model,
        len(data.train),
        num_classes,
        amp_dtype=AMP_DTYPES[amp],
        **optimizer_options(cfg),
    )


def build_step(
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    dist: distributed.DistInfo | None = None,
    amp: str | None = None,
    loss_term: TrajectoryLoss | None = None,
) -> SharpnessAwareStep:
    """The training step (DistributedDataParallel under torchrun); BatchNorm running statistics
    come from the first pass, as in the seed. ``amp``: the resolved ``--amp`` (see
    :func:`amp_for`; resolved here when not given). ``loss_term``: SAF's or MESA's trajectory
    loss, added to the training loss (:func:`build_trajectory`)."""
    loss_fn = build_loss(cfg, list(model.parameters()))
    step_model: nn.Module = model
    if dist is not None:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    return SharpnessAwareStep(
        step_model,
        optimizer,
        loss_term.wrap(loss_fn) if loss_term is not None else loss_fn,
        m=cfg.sam_m if cfg.sharpness_aware else None,
        max_grad_norm=cfg.gradient_clipping or None,
        amp=amp if amp is not None else amp_for(cfg, device, dist),
        bn_stats="first",
        sync_perturbations=cfg.sync_perturbations,
    )
