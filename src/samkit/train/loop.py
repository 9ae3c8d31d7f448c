"""The training loop behind ``samkit train``: SAM (or plain SGD) on Fashion-MNIST.

Everything is seeded by ``run_seed``: the model initialisation (``torch.manual_seed``) and the
data order and augmentation (a generator seeded with ``run_seed + epoch``), so two runs with the
same configuration on the same machine give the same numbers.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from samkit.data import FashionMNIST, TensorBatchLoader
from samkit.models import create_model
from samkit.optim import SAM
from samkit.train.config import TrainConfig
from samkit.train.step import SharpnessAwareStep

__all__ = [
    "TrainConfig",
    "TrainingDivergedError",
    "cosine_lr",
    "evaluate",
    "run_dir_for",
    "train",
]


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


def cosine_lr(step: int, total_steps: int, base_lr: float) -> float:
    """Cosine decay from ``base_lr`` at step 0 to 0 at ``total_steps``."""
    t = min(step, total_steps) / max(1, total_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * t))


def run_dir_for(cfg: TrainConfig) -> Path:
    """``output_dir/lr_{lr}/wd_{wd}/rho_{rho}/seed_{seed}``, the layout of the seed system."""
    return (
        Path(cfg.output_dir)
        / f"lr_{cfg.learning_rate:g}"
        / f"wd_{cfg.weight_decay:g}"
        / f"rho_{cfg.sam_rho:g}"
        / f"seed_{cfg.run_seed}"
    )


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
    base = getattr(optimizer, "base_optimizer", None)
    if base is not None and base.param_groups is not optimizer.param_groups:
        for group in base.param_groups:
            group["lr"] = lr


def _build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    sgd_kwargs = dict(
        lr=cfg.learning_rate,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )
    if cfg.sam_rho == 0:
        return torch.optim.SGD(model.parameters(), **sgd_kwargs)
    return SAM(model.parameters(), torch.optim.SGD, rho=cfg.sam_rho, **sgd_kwargs)


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: TensorBatchLoader, memory_format: torch.memory_format
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader``."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for x, y in loader:
        logits = model(x.contiguous(memory_format=memory_format))
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += y.numel()
    return total_loss / max(1, count), correct / max(1, count)


def _param_norm(model: nn.Module) -> float:
    with torch.no_grad():
        norms = [p.detach().norm(2) for p in model.parameters()]
        return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


class _Scalars:
    """TensorBoard scalars, if tensorboard is installed and enabled; a no-op otherwise."""

    def __init__(self, enabled: bool, log_dir: Path, log: Callable[[str], None]):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("note: tensorboard is not installed; no TensorBoard scalars are written")
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def add(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(cfg: TrainConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one training job; write ``metrics.jsonl`` and ``summary.json`` into the run
    directory (:func:`run_dir_for`) and return the summary.

    Raises :class:`samkit.data.DataNotFoundError` / :class:`samkit.data.IDXFormatError` for
    missing or bad data, :class:`TrainingDivergedError` if the loss stops being finite.
    """
    log = log or (lambda msg: tqdm.write(msg, file=sys.stdout))
    wall_start = time.perf_counter()
    device = torch.device(cfg.device)
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, device, log, wall_start)
    finally:
        torch.set_num_threads(threads_before)


def _train(
    cfg: TrainConfig, device: torch.device, log: Callable[[str], None], wall_start: float
) -> dict[str, Any]:
    # channels_last is markedly faster for convolutions on the CPU (oneDNN).
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format

    train_set = FashionMNIST("train", cfg.data_dir, subset=cfg.train_subset)
    test_set = FashionMNIST("test", cfg.data_dir)
    train_loader = TensorBatchLoader(
        train_set.images,
        train_set.labels,
        cfg.batch_size,
        shuffle=True,
        drop_last=len(train_set) > cfg.batch_size,
        augment=cfg.augment,
        seed=cfg.run_seed,
        device=device,
    )
    test_loader = TensorBatchLoader(
        test_set.images, test_set.labels, cfg.eval_batch_size, device=device
    )

    torch.manual_seed(cfg.run_seed)
    model = create_model(cfg.model, num_classes=10, in_channels=1)
    model = model.to(device=device, memory_format=memory_format)
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = _build_optimizer(cfg, model)
    # BatchNorm running statistics from the first pass only, as in the official code.
    train_step = SharpnessAwareStep(model, optimizer, nn.CrossEntropyLoss(), bn_stats="first")

    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("")
    scalars = _Scalars(cfg.tensorboard, run_dir, log)

    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    method = f"SAM rho={cfg.sam_rho:g}" if cfg.sam_rho > 0 else "SGD"
    log(
        f"samkit train: {cfg.model} ({num_params:,} parameters), {method}, "
        f"{len(train_set):,} train / {len(test_set):,} test images, {cfg.epochs} epochs "
        f"x {steps_per_epoch} steps, device {device}, threads {torch.get_num_threads()}"
    )

    step = 0
    train_seconds = eval_seconds = 0.0
    test_loss = test_acc = float("nan")
    best_acc = 0.0
    history: list[dict[str, Any]] = []
    try:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            train_loader.set_epoch(epoch - 1)
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            correct_sum = torch.zeros((), dtype=torch.long, device=device)
            grad_norm_sum = torch.zeros((), device=device)
            grad_norm_count = 0
            seen = 0
            bar = tqdm(
                train_loader,
                desc=f"epoch {epoch}/{cfg.epochs}",
                leave=False,
                disable=None if cfg.progress is None else not cfg.progress,
                dynamic_ncols=True,
            )
            for x, y in bar:
                lr = cosine_lr(step, total_steps, cfg.learning_rate)
                _set_lr(optimizer, lr)
                out = train_step(x.contiguous(memory_format=memory_format), y)
                step += 1
                if out.took_step:  # skipped steps (non-finite loss/gradients) are not averaged
                    n = y.numel()
                    seen += n
                    loss_sum += out.loss * n
                    correct_sum += (out.outputs.argmax(1) == y).sum()
                    if out.grad_norm is not None:
                        grad_norm_sum += out.grad_norm
                        grad_norm_count += 1
                if seen and (step % 50 == 0 or step == total_steps):
                    running = loss_sum.item() / seen
                    bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr:.4f}", refresh=False)
                    scalars.add({"train_loss_step": running, "learning_rate": lr}, step)
            bar.close()
            train_loss = loss_sum.item() / max(1, seen)
            train_acc = correct_sum.item() / max(1, seen)
            epoch_train = time.perf_counter() - t0
            train_seconds += epoch_train
            if seen == 0 or not math.isfinite(train_loss):
                raise TrainingDivergedError(
                    f"training diverged in epoch {epoch}: every step had a non-finite loss or "
                    f"gradient; try a smaller --learning-rate"
                )

            t1 = time.perf_counter()
            test_loss, test_acc = evaluate(model, test_loader, memory_format)
            if not math.isfinite(test_loss):
                raise TrainingDivergedError(
                    f"training diverged in epoch {epoch}: the test loss is {test_loss}; "
                    f"try a smaller --learning-rate"
                )
            eval_seconds += time.perf_counter() - t1
            best_acc = max(best_acc, test_acc)
            record = {
                "epoch": epoch,
                "step": step,
                "learning_rate": cosine_lr(step, total_steps, cfg.learning_rate),
                "train_loss": train_loss,
                "train_error_rate": 1.0 - train_acc,
                "test_loss": test_loss,
                "test_error_rate": 1.0 - test_acc,
                "test_accuracy": test_acc,
                "gradient_norm": grad_norm_sum.item() / max(1, grad_norm_count),
                "param_norm": _param_norm(model),
                "skipped_steps": train_step.skipped_steps,
                "epoch_seconds": epoch_train,
                "train_images_per_second": seen / epoch_train if epoch_train > 0 else None,
                "wall_seconds": time.perf_counter() - wall_start,
            }
            history.append(record)
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            scalars.add(
                {
                    k: record[k]
                    for k in (
                        "train_loss",
                        "train_error_rate",
                        "test_loss",
                        "test_error_rate",
                        "gradient_norm",
                        "param_norm",
                    )
                },
                step,
            )
            log(
                f"epoch {epoch:>3}/{cfg.epochs}  train loss {train_loss:.4f} "
                f"acc {train_acc:.2%}  test loss {test_loss:.4f} acc {test_acc:.2%}  "
                f"({epoch_train:.0f}s, {record['train_images_per_second']:.0f} img/s)"
            )
    finally:
        scalars.close()

    summary = {
        "config": cfg.to_dict(),
        "data_dir": str(train_set.root),
        "model": cfg.model,
        "num_parameters": num_params,
        "optimizer": method,
        "epochs_completed": len(history),
        "steps": step,
        "skipped_steps": train_step.skipped_steps,
        "final_test_accuracy": test_acc,
        "final_test_error_rate": 1.0 - test_acc,
        "final_test_loss": test_loss,
        "best_test_accuracy": best_acc,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "run_dir": str(run_dir),
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(
        f"final test accuracy {test_acc:.2%} (error {1 - test_acc:.2%}) after {len(history)} "
        f"epochs in {summary['wall_seconds']:.0f}s; results in {run_dir}"
    )
    return summary
