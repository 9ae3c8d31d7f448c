"""The training loop behind ``samkit train``.

One run trains ``cfg.model_name`` on ``cfg.dataset`` with SAM, ESAM or plain SGD (every step
through :class:`~samkit.train.step.SharpnessAwareStep`), a cosine learning-rate schedule updated
every step, and evaluates after every ``evaluate_every`` epochs. It writes into its run directory
(``output_dir/lr_{lr}/wd_{wd}/rho_{rho}/seed_{seed}/`` as the seed system, or ``run_dir``):

* ``config.json``: every resolved setting, versions, device, and the run-directory contract keys
  (``model_name``, ``num_classes``, ``in_channels``, ``dataset``, ``model_kwargs``);
* ``metrics.jsonl``: one record per epoch; ``summary.json`` at the end;
* TensorBoard scalars under the seed's names, plus ``images_per_sec``;
* ``checkpoints/``: every ``save_progress_seconds`` and at each epoch end (keep 2), holding
  everything needed to continue the run bit for bit: model, optimizer (with momentum), schedule,
  step-helper state (GradScaler), EMA, position in the data order (epoch and batch), the running
  sums of the epoch's metrics, the metric history and the RNG states;
* ``label_noise.json`` / ``bootstrap.json`` when the training labels were changed.

A new invocation with the same settings resumes from the latest good checkpoint (a corrupt one is
skipped) and continues the same batch sequence, so a run killed at any moment and restarted ends
with exactly the weights of an uninterrupted run. SIGINT and SIGTERM save a checkpoint and stop
(:class:`TrainingInterrupted`).

Everything is seeded by ``run_seed``: the model initialisation, the data order and augmentation
(explicit generators, see :mod:`samkit.data.loader`), label noise and ESAM's weight masks.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from samkit.train import distributed as _dist
from samkit.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_latest_checkpoint,
    save_checkpoint,
)
from samkit.train.config import RESUME_IGNORED, TrainConfig
from samkit.train.run import CHECKPOINT_DIR, CONFIG_FILE
from samkit.train.step import SharpnessAwareStep

__all__ = [
    "ConfigError",
    "CosineSchedule",
    "EMA",
    "TrainConfig",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "cosine_lr",
    "evaluate_model",
    "run_dir_for",
    "train",
]

#: The holdout (``use_test_set=False``) is drawn with this seed whatever ``run_seed`` is, so
#: that runs with different seeds are compared on the same validation images.
HOLDOUT_SEED = 0
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
#: Testing hook: seconds to sleep after every training step (lets a test kill a run mid-epoch).
STEP_DELAY_ENV = "SAMKIT_TEST_STEP_DELAY"
#: Testing hook: "RANK:STEP" makes that torchrun rank raise before that (1-based) step.
FAIL_RANK_ENV = "SAMKIT_TEST_FAIL_RANK"
#: Testing hook: seconds to sleep at the start of every evaluation, announced by a log line (lets
#: a test signal a run while it evaluates).
EVAL_DELAY_ENV = "SAMKIT_TEST_EVAL_DELAY"


class ConfigError(ValueError):
    """A setting that cannot work (the message names the flag); the CLI exits with status 2."""


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after saving a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path | None):
        self.signum = signum
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint written"
        super().__init__(f"interrupted by {name}; {where}")


# --------------------------------------------------------------------------------------------
# Schedule, EMA, evaluation
# --------------------------------------------------------------------------------------------


def cosine_lr(step: int, total_steps: int, base_lr: float) -> float:
    """Cosine decay from ``base_lr`` at step 0 to 0 at ``total_steps``."""
    t = min(step, total_steps) / max(1, total_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * t))


class CosineSchedule:
    """The seed's schedule: cosine decay per step. ``apply()`` sets the learning rate of the
    coming step on every param group; ``step()`` counts a step. Checkpointable."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, total_steps: int):
        self.optimizer, self.base_lr, self.total_steps = optimizer, base_lr, total_steps
        self.steps_done = 0

    def lr(self) -> float:
        return cosine_lr(self.steps_done, self.total_steps, self.base_lr)

    def apply(self) -> float:
        lr = self.lr()
        groups = [self.optimizer.param_groups]
        base = getattr(self.optimizer, "base_optimizer", None)
        if base is not None and base.param_groups is not self.optimizer.param_groups:
            groups.append(base.param_groups)
        for param_groups in groups:
            for group in param_groups:
                group["lr"] = lr
        return lr

    def step(self) -> None:
        self.steps_done += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps_done": self.steps_done,
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])


class EMA:
    """Exponential moving average of a model's state (weights and BatchNorm statistics):
    ``shadow = decay * shadow + (1 - decay) * current`` after every step taken; integer buffers
    (``num_batches_tracked``) are copied."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), not {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        floats = [k for k, v in self.shadow.items() if v.is_floating_point()]
        if floats:
            torch._foreach_lerp_(
                [self.shadow[k] for k in floats], [current[k] for k in floats], 1.0 - self.decay
            )
        for k, v in self.shadow.items():
            if not v.is_floating_point():
                v.copy_(current[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in self.shadow.items():
            v.copy_(state[k])


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


def memory_format_for(device: torch.device) -> torch.memory_format:
    # channels_last is markedly faster for convolutions on the CPU (oneDNN).
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def run_dir_for(cfg: TrainConfig) -> Path:
    """``cfg.run_dir`` if given, else ``output_dir/lr_{lr}/wd_{wd}/rho_{rho}/seed_{seed}`` (the
    seed system's layout; rho is 0 for plain SGD)."""
    if cfg.run_dir is not None:
        return Path(cfg.run_dir)
    return (
        Path(cfg.output_dir)
        / f"lr_{cfg.learning_rate:g}"
        / f"wd_{cfg.weight_decay:g}"
        / f"rho_{cfg.effective_rho:g}"
        / f"seed_{cfg.run_seed}"
    )


def default_eval_batch_size(cfg: TrainConfig, in_memory: bool) -> int:
    if cfg.eval_batch_size is not None:
        return cfg.eval_batch_size
    return 1000 if in_memory else cfg.batch_size


def describe_optimizer(cfg: TrainConfig) -> str:
    if not cfg.sharpness_aware:
        return "SGD"
    name = ("ASAM" if cfg.sam_adaptive else "SAM") if cfg.optimizer == "sam" else "ESAM"
    text = f"{name} rho={cfg.sam_rho:g}"
    if cfg.optimizer == "esam":
        text += f" beta={cfg.esam_beta:g} gamma={cfg.esam_gamma:g}"
        text += " adaptive" if cfg.sam_adaptive else ""
    if cfg.sam_m:
        text += f" m={cfg.sam_m}"
    return text


# --------------------------------------------------------------------------------------------
# Small helpers: JSON files, RNG state, signals
# --------------------------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temporary file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _rng_state(device: torch.device) -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
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


class _StopSignals:
    """Turns SIGINT / SIGTERM into a request to stop at the next step boundary (a second SIGINT
    raises ``KeyboardInterrupt`` at once). Only installed in the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Scalars:
    """TensorBoard scalars, if tensorboard is installed and enabled; a no-op otherwise."""

    def __init__(
        self, enabled: bool, log_dir: Path, log: Callable[[str], None], purge_step: int | None
    ):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("note: tensorboard is not installed; no TensorBoard scalars are written")
            return
        # purge_step hides the events a killed process logged after its last checkpoint.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def add(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        # A closed SummaryWriter silently opens a new event file on the next add_scalar (and
        # nothing closes that one): later scalars are dropped instead.
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _versions() -> dict[str, str]:
    import torchvision

    try:
        from importlib.metadata import version

        samkit_version = version("samkit")
    except Exception:
        samkit_version = "unknown"
    return {
        "samkit": samkit_version,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "num_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["cuda_device_name"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["cpu_count"] = os.cpu_count()
    return info


def _resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Absolute paths, so that a run's config names the same files from anywhere."""
    cfg = copy.copy(cfg)
    for name in ("data_dir", "bootstrap_from", "pretrained_checkpoint", "run_dir"):
        value = getattr(cfg, name)
        if value is not None:
            setattr(cfg, name, str(Path(value).expanduser().absolute()))
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().absolute())
    return cfg


def _config_differences(old: dict[str, Any], new: TrainConfig) -> list[str]:
    defaults = TrainConfig().to_dict()
    out = []
    for key, value in new.to_dict().items():
        if key in RESUME_IGNORED:
            continue
        before = old.get(key, defaults[key])
        if before != value:
            out.append(f"--{key.replace('_', '-')} {before!r} -> {value!r}")
    return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) one training job and return its summary (also in ``summary.json``).

    Raises :class:`ConfigError` for settings that cannot work (naming the flag),
    :class:`samkit.data.DataNotFoundError` / :class:`samkit.data.DataFormatError` for missing or
    bad data, :class:`TrainingDivergedError` if the loss stops being finite,
    :class:`TrainingInterrupted` after SIGINT / SIGTERM (a checkpoint was saved) and
    :class:`~samkit.train.checkpoint.CheckpointError` when no checkpoint in the run is usable.
    """
    info = _dist.from_env()
    if info is not None and not info.is_main:
        log = lambda msg: None  # noqa: E731 -- only rank 0 talks
    log = log or (lambda msg: tqdm.write(msg, file=sys.stdout))
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    created = succeeded = False
    try:
        if info is not None:
            device = _device_for(cfg, info)
            if cfg.sync_bn and not _dist.sync_bn_supported(device):
                raise ConfigError(
                    f"--sync-bn: torch.nn.SyncBatchNorm does not run on {device.type} (torch "
                    f"{torch.__version__.split('+')[0]} synchronises BatchNorm statistics on "
                    f"{'/'.join(_dist.SYNC_BN_DEVICE_TYPES)} devices only); train with --device "
                    "cuda, or without --sync-bn (each process then normalises over its own share "
                    "of the batch)"
                )
            if device.type == "cuda":
                torch.cuda.set_device(device)
            created = _dist.init_process_group(info, device, cfg.dist_timeout)
        summary = _Run(_resolve_paths(cfg), log, info).run()
        succeeded = True
        return summary
    finally:
        torch.set_num_threads(threads_before)
        # After success the group stays up: the CLI leaves with os._exit, because gloo's C++
        # teardown races with the other ranks' exits and can abort a finished run (SIGABRT).
        if created and not succeeded:
            torch.distributed.destroy_process_group()


def _device_for(cfg: TrainConfig, info: _dist.DistInfo | None) -> torch.device:
    """``--device``; under torchrun a bare ``cuda`` means ``cuda:LOCAL_RANK``."""
    device = torch.device(cfg.device)
    if info is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
    return device


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


class _EpochStats:
    """Running sums of one epoch's training metrics (kept in checkpoints for mid-epoch resume)."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.wrong_sum = torch.zeros((), dtype=torch.long, device=device)
        self.grad_norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.grad_norm_count = 0
        self.seen = 0
        self.seconds = 0.0

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


class _Run:
    def __init__(
        self, cfg: TrainConfig, log: Callable[[str], None], dist: _dist.DistInfo | None = None
    ):
        self.cfg, self.log = cfg, log
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        self.world_size = 1 if dist is None else dist.world_size
        self.device = _device_for(cfg, dist)
        self.stop_signum: int | None = None  # under torchrun: the stop request all ranks agreed
        self.memory_format = memory_format_for(self.device)
        self.run_dir = run_dir_for(cfg)
        self.ckpt_dir = self.run_dir / CHECKPOINT_DIR
        self.wall_start = time.perf_counter()

    # -- setup ---------------------------------------------------------------------------------

    def _discard_existing_run(self) -> None:
        """--no-resume: delete the run directory's checkpoints (once the new run is set up)."""
        existing = list_checkpoints(self.ckpt_dir)
        for path in existing:
            path.unlink(missing_ok=True)
        if existing:
            for path in (self.run_dir / METRICS_FILE, self.run_dir / SUMMARY_FILE):
                path.unlink(missing_ok=True)
            self.log(f"--no-resume: discarded {len(existing)} checkpoint(s) in {self.ckpt_dir}")

    def _check_existing_run(self) -> None:
        """Refuse to resume a run whose settings differ."""
        existing = list_checkpoints(self.ckpt_dir)
        if not existing:
            return
        config_path = self.run_dir / CONFIG_FILE
        try:
            old = json.loads(config_path.read_text())
        except (OSError, ValueError):
            raise ConfigError(
                f"{self.run_dir} holds checkpoints but no readable {CONFIG_FILE}; cannot check "
                "that they belong to this configuration (use --no-resume to start over, or "
                "another --output-dir / --run-dir)"
            ) from None
        diffs = _config_differences(old, self.cfg)
        if diffs:
            raise ConfigError(
                f"{self.run_dir} holds a run with other settings ({'; '.join(diffs[:6])}"
                f"{'; ...' if len(diffs) > 6 else ''}); refusing to mix them: use --no-resume to "
                "discard that run, or another --output-dir / --run-dir"
            )

    def _build_data(self) -> None:
        from samkit.data import build_datasets, make_loader

        cfg = self.cfg
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
            from samkit.data import DataFormatError

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
        if self.dist is not None:
            world = self.dist.world_size
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
        self.info = info
        self.train_ds, self.eval_ds = train_ds, eval_ds
        self.eval_batch_size = default_eval_batch_size(cfg, info.in_memory)
        self._make_loader = make_loader

    def _bootstrap(self) -> None:
        """Relabel the training set with a finished run's predictions (--bootstrap-from)."""
        from samkit.data import bootstrap_labels
        from samkit.train.run import load_run_model

        cfg = self.cfg
        source = Path(cfg.bootstrap_from)
        try:
            loaded = load_run_model(source, map_location=self.device, use_ema=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--bootstrap-from {source}: {exc}") from None
        theirs = (loaded.config.get("num_classes"), loaded.config.get("in_channels"))
        ours = (self.info.num_classes, self.info.in_channels)
        if theirs != ours:
            raise ConfigError(
                f"--bootstrap-from {source}: that run's model has {theirs[0]} classes and "
                f"{theirs[1]} input channels; {cfg.dataset} needs {ours[0]} and {ours[1]}"
            )
        if not (loaded.run_dir / SUMMARY_FILE).is_file():
            self.log(f"note: {loaded.run_dir} has no {SUMMARY_FILE}; it may not have finished")
        model = loaded.model.to(memory_format=self.memory_format)
        loader = self._make_loader(
            self.train_ds,
            self.eval_batch_size,
            train=False,
            workers=cfg.workers,
            device=self.device,
        )
        predictions = []
        with torch.inference_mode():
            model.eval()
            for x, _ in loader:
                predictions.append(model(x.contiguous(memory_format=self.memory_format)).argmax(1))
        labels = bootstrap_labels(torch.cat(predictions).cpu(), self.info.num_classes)
        original = self.train_ds.labels
        self.train_ds = self.train_ds.with_labels(labels)
        self.bootstrap_record = {
            "source_run": str(loaded.run_dir),
            "checkpoint": str(loaded.checkpoint_path),
            "weights": "ema" if loaded.state.get("ema") is not None else "model",
            "num_examples": int(labels.numel()),
            "num_changed": int((labels != original).sum()),
            "agreement_with_original_labels": float((labels == original).double().mean()),
        }
        self.log(
            f"bootstrap: relabelled {labels.numel():,} training images with the predictions of "
            f"{loaded.run_dir} ({self.bootstrap_record['num_changed']:,} labels changed)"
        )
        del loaded, model

    def _build_model(self) -> None:
        from samkit.models import create_model, freeze_batchnorm_statistics, load_pretrained
        from samkit.optim import ESAM, SAM

        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.run_seed)
        random.seed(cfg.run_seed)
        np.random.seed(cfg.run_seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(cfg.run_seed)
        model = create_model(
            cfg.model_name, num_classes=info.num_classes, in_channels=info.in_channels
        )
        if cfg.from_pretrained_checkpoint:
            try:
                report = load_pretrained(model, cfg.pretrained_checkpoint)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--pretrained-checkpoint: {exc}") from None
            head = f"; new head ({', '.join(report.dropped)})" if report.new_head else ""
            self.log(
                f"fine-tuning from {cfg.pretrained_checkpoint}: {len(report.loaded)} tensors "
                f"loaded{head}"
            )
        model = model.to(device=self.device, memory_format=self.memory_format)
        self.sync_bn_layers = 0
        if cfg.sync_bn and self.dist is not None:  # before freezing: conversion drops BN hooks
            model, self.sync_bn_layers = _dist.convert_sync_batchnorm(model)
            self.log(
                f"--sync-bn: {self.sync_bn_layers} BatchNorm layers converted to SyncBatchNorm "
                f"(statistics over the global batch of {self.world_size} processes)"
            )
        elif cfg.sync_bn:
            self.log("--sync-bn: no effect in a single process (BatchNorm already sees the batch)")
        if cfg.freeze_bn_stats:
            count = freeze_batchnorm_statistics(model)
            self.log(f"BatchNorm statistics frozen in {count} layers")
        self.model = model
        self.num_params = sum(p.numel() for p in model.parameters())

        sgd = dict(
            lr=cfg.learning_rate,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay if cfg.weight_decay_mode == "decoupled" else 0.0,
        )
        params = list(model.parameters())
        if not cfg.sharpness_aware:
            optimizer: torch.optim.Optimizer = torch.optim.SGD(params, **sgd)
        elif cfg.optimizer == "sam":
            optimizer = SAM(
                params, torch.optim.SGD, rho=cfg.sam_rho, adaptive=cfg.sam_adaptive, **sgd
            )
        else:
            optimizer = ESAM(
                params,
                torch.optim.SGD,
                rho=cfg.sam_rho,
                beta=cfg.esam_beta,
                gamma=cfg.esam_gamma,
                sds_criterion=cfg.esam_criterion,
                adaptive=cfg.sam_adaptive,
                seed=cfg.run_seed,
                **sgd,
            )
        self.optimizer = optimizer

        smoothing = cfg.label_smoothing
        l2 = 0.5 * cfg.weight_decay if cfg.weight_decay_mode == "loss" else 0.0

        def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            losses = F.cross_entropy(outputs, targets, reduction="none", label_smoothing=smoothing)
            if l2:  # the seed: 0.5 * wd * ||w||^2 in the loss, so it enters the perturbation
                losses = losses + l2 * torch.stack([p.square().sum() for p in params]).sum()
            return losses

        step_model: nn.Module = model
        if self.dist is not None:
            step_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        self.ddp_model = step_model
        self.step_fn = SharpnessAwareStep(
            step_model,
            optimizer,
            loss_fn,
            m=cfg.sam_m if cfg.sharpness_aware else None,
            max_grad_norm=cfg.gradient_clipping or None,
            amp=cfg.amp,
            bn_stats="first",  # BatchNorm running statistics from the first pass, as the seed
            sync_perturbations=cfg.sync_perturbations,
        )
        # Under torchrun each rank loads and augments only its rows of every global batch
        # (identical to slicing the global batch; see samkit.data.loader).
        self.train_loader = self._make_loader(
            self.train_ds,
            cfg.batch_size,
            train=True,
            seed=cfg.run_seed,
            workers=cfg.workers,
            device=self.device,
            shard=(self.dist.rank, self.dist.world_size) if self.dist is not None else None,
        )
        eval_ds = self.eval_ds
        if self.dist is not None:  # each rank evaluates its own shard; the sums are all-reduced
            shard = _dist.eval_shard(len(eval_ds), self.dist)
            subset = getattr(eval_ds, "subset", None)
            eval_ds = subset(torch.arange(shard.start, shard.stop)) if subset else None
            eval_ds = eval_ds if eval_ds is not None else _ShardView(self.eval_ds, shard)
        self.eval_loader = self._make_loader(
            eval_ds,
            self.eval_batch_size,
            train=False,
            workers=cfg.workers,
            device=self.device,
        )
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.num_epochs * self.steps_per_epoch
        self.schedule = CosineSchedule(optimizer, cfg.learning_rate, self.total_steps)
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.eval_copy = copy.deepcopy(model) if self.ema is not None else None

    # -- state ---------------------------------------------------------------------------------

    def _fresh_state(self) -> None:
        self.epoch = 0  # 0-based epoch in progress
        self.batch = 0  # next batch within it
        self.global_step = 0
        self.stats = _EpochStats(self.device)
        self.history: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.images_trained = 0
        self.resumed_from: Path | None = None

    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "step_helper": self.step_fn.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch,
            "batch": self.batch,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch_stats": self.stats.state_dict(),
            "history": self.history,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "images_trained": self.images_trained,
            "world_size": self.world_size,
            "rng": _rng_state(self.device),
            "config": self.cfg.to_dict(),
        }

    def _load_state(self, path: Path, state: dict[str, Any]) -> None:
        if state.get("steps_per_epoch") != self.steps_per_epoch:
            raise CheckpointError(
                f"{path}: written for {state.get('steps_per_epoch')} steps per epoch, this run "
                f"has {self.steps_per_epoch}; the data changed (use --no-resume to start over)"
            )
        if int(state.get("world_size", 1)) != self.world_size:
            raise CheckpointError(
                f"{path}: written by a run with {state.get('world_size', 1)} processes, this one "
                f"has {self.world_size}; the perturbations (m = per-process batch) would change "
                "(use --no-resume to start over)"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["scheduler"])
            self.step_fn.load_state_dict(state["step_helper"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.stats.load_state_dict(state["epoch_stats"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{path}: does not fit this run ({type(exc).__name__}: {exc}); use --no-resume "
                "to start over"
            ) from None
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.train_seconds = float(state["train_seconds"])
        self.eval_seconds = float(state["eval_seconds"])
        self.images_trained = int(state["images_trained"])
        _set_rng_state(state["rng"], self.device)
        self.resumed_from = path

    def _save(self) -> Path | None:
        """Write a checkpoint of the current position; a same-step one (written moments ago at the
        same position, e.g. before an epoch-end evaluation) is replaced. Under torchrun only rank
        0 writes (the ranks hold the same weights)."""
        if not self.is_main:
            self.last_save = time.monotonic()
            return None
        same_step = [
            p
            for p in list_checkpoints(self.ckpt_dir)
            if p.name.startswith(f"ckpt-{self.global_step:09d}-")
        ]
        path = save_checkpoint(
            self._state(), self.ckpt_dir, self.global_step, keep=2 + len(same_step)
        )
        for p in same_step:
            if p != path:
                p.unlink(missing_ok=True)
        self.last_save = time.monotonic()
        return path

    # -- outputs -------------------------------------------------------------------------------

    def _write_config(self) -> None:
        cfg, info = self.cfg, self.info
        config = {
            **cfg.to_dict(),
            "run_dir": str(self.run_dir),
            # The run-directory contract (samkit.train.run):
            "model_name": cfg.model_name,
            "num_classes": info.num_classes,
            "in_channels": info.in_channels,
            "dataset": cfg.dataset,
            "model_kwargs": {},
            # Resolved details:
            "effective_sam_rho": cfg.effective_rho,
            "optimizer_description": describe_optimizer(cfg),
            "eval_split": "test" if cfg.use_test_set else "holdout",
            "holdout_seed": HOLDOUT_SEED,
            "eval_batch_size_resolved": self.eval_batch_size,
            "image_size_resolved": cfg.image_size or info.image_size,
            "classes": list(info.classes) if info.classes is not None else None,
            "train_size": len(self.train_ds),
            "eval_size": len(self.eval_ds),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "num_parameters": self.num_params,
            "sync_bn_layers": self.sync_bn_layers,
            "memory_format": "channels_last"
            if self.memory_format == torch.channels_last
            else "contiguous",
            "versions": _versions(),
            "device_info": _device_info(self.device),
            "command": sys.argv,
        }
        write_json(self.run_dir / CONFIG_FILE, config)

    def _write_history(self) -> None:
        tmp = self.run_dir / f".{METRICS_FILE}.tmp-{os.getpid()}"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        os.replace(tmp, self.run_dir / METRICS_FILE)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with (self.run_dir / METRICS_FILE).open("a") as f:
            f.write(json.dumps(record) + "\n")

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.resume:
            self._check_existing_run()
        self._build_data()
        self.bootstrap_record = None
        if cfg.bootstrap_from:
            self._bootstrap()
        self._build_model()
        self._fresh_state()
        if cfg.resume:
            latest = load_latest_checkpoint(self.ckpt_dir, map_location=self.device)
            if latest is not None:
                self._load_state(*latest)
        elif self.is_main:
            self._discard_existing_run()
        if self.dist is not None:  # every rank has read the checkpoint before rank 0 writes one
            torch.distributed.barrier()

        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()
            record = getattr(self.train_ds, "label_noise", None)
            if record is not None:
                from samkit.data import save_label_noise

                save_label_noise(record, self.run_dir)
            if self.bootstrap_record is not None:
                write_json(self.run_dir / "bootstrap.json", self.bootstrap_record)
            self._write_history()
        self.scalars = _Scalars(
            cfg.tensorboard and self.is_main,
            self.run_dir,
            self.log,
            purge_step=self.global_step if self.resumed_from else None,
        )
        where = (
            f"resuming from {self.resumed_from.name} (epoch {self.epoch + 1}, batch "
            f"{self.batch}/{self.steps_per_epoch})"
            if self.resumed_from
            else "starting"
        )
        self.log(
            f"samkit train: {cfg.model_name} ({self.num_params:,} parameters), "
            f"{describe_optimizer(cfg)}, {cfg.dataset}: {len(self.train_ds):,} train / "
            f"{len(self.eval_ds):,} {'test' if cfg.use_test_set else 'holdout'} images, "
            f"{cfg.num_epochs} epochs x {self.steps_per_epoch} steps, device {self.device}, "
            f"threads {torch.get_num_threads()}"
            + (
                f", {self.world_size} processes x {cfg.batch_size // self.world_size} images"
                + (" (synced perturbations)" if cfg.sync_perturbations else "")
                + (" (SyncBatchNorm)" if self.sync_bn_layers else "")
                if self.dist is not None
                else ""
            )
            + f"; {where}; run dir {self.run_dir}"
        )
        self.last_save = time.monotonic()
        self.stop_reason = "completed"
        try:
            # The handlers stay installed through the final evaluation and, under torchrun, the
            # last barrier: a signal then must not kill one rank in the middle of a collective
            # (the others would fail with a connection error). _finish agrees on a stop after its
            # evaluations; a signal arriving later lets the finished run exit normally.
            with _StopSignals() as signals:
                self.signals = signals
                self._loop()
                summary = self._finish()
                if self.dist is not None:  # every rank is done before any leaves
                    torch.distributed.barrier()
        finally:
            self.scalars.close()
        return summary

    def _loop(self) -> None:
        cfg = self.cfg
        delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
        while self.epoch < cfg.num_epochs:
            if self._max_steps_reached():
                return
            self.model.train()
            self.train_loader.set_epoch(self.epoch, start_batch=self.batch)
            batches = iter(self.train_loader)
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=self.batch,
                desc=f"epoch {self.epoch + 1}/{cfg.num_epochs}",
                leave=False,
                disable=None if cfg.progress is None else not cfg.progress,
                dynamic_ncols=True,
            )
            try:
                while self.batch < self.steps_per_epoch:
                    if self._max_steps_reached():
                        self._save()
                        return
                    t0 = time.perf_counter()
                    x, y = next(batches)
                    self._train_step(x, y)
                    self.stats.seconds += time.perf_counter() - t0
                    bar.update(1)
                    if delay:
                        time.sleep(delay)
                    if self.global_step % 50 == 0 and self.stats.seen:
                        running = self.stats.loss_sum.item() / self.stats.seen
                        bar.set_postfix(loss=f"{running:.3f}", refresh=False)
                        self.scalars.add({"learning_rate": self.schedule.lr()}, self.global_step)
                    if self._stop_requested() is not None:
                        self._interrupted()
                    last = self.batch == self.steps_per_epoch
                    due = time.monotonic() - self.last_save >= cfg.save_progress_seconds
                    if due and not last:
                        self._save()
            finally:
                bar.close()
                if hasattr(batches, "close"):
                    batches.close()
            self._end_epoch()
            # A signal during the epoch-end evaluation: stop here (all ranks together).
            if self._agree_on_stop() is not None:
                self._interrupted()

    def _stop_requested(self) -> int | None:
        """The signal that asks to stop; under torchrun the one all ranks agreed on in the last
        step (so that they all stop at the same step)."""
        return self.signals.signum if self.dist is None else self.stop_signum

    def _agree_on_stop(self) -> int | None:
        """:meth:`_stop_requested`, but under torchrun first agree across ranks whether any got a
        signal since the last step (one small all-reduce: every rank must call it at the same
        point). Used after evaluations, which have no per-step agreement."""
        if self.dist is not None and self.stop_signum is None:
            local = self.signals.signum or 0
            flag = torch.tensor([float(local)], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() > 0:
                self.stop_signum = local or int(flag.item())
        return self._stop_requested()

    def _max_steps_reached(self) -> bool:
        if self.cfg.max_steps is not None and self.global_step >= self.cfg.max_steps:
            self.stop_reason = "max_steps"
            return True
        return False

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.dist is not None:  # x, y: this rank's share of the global batch (sharded loader)
            fail = os.environ.get(FAIL_RANK_ENV)
            if fail and fail == f"{self.dist.rank}:{self.global_step + 1}":
                raise RuntimeError(f"{FAIL_RANK_ENV}: injected failure at step {fail}")
        self.schedule.apply()
        out = self.step_fn(x.contiguous(memory_format=self.memory_format), y)
        self.schedule.step()
        self.global_step += 1
        self.batch += 1
        n = y.numel()
        with torch.no_grad():
            ce = F.cross_entropy(out.outputs.float(), y, reduction="sum").double()
            wrong = (out.outputs.argmax(1) != y).sum()
        if self.dist is not None:
            # One small all-reduce per step: the epoch sums over the global batch (identical on
            # every rank, so rank 0's checkpoint is right for all) and the stop request.
            signum = self.signals.signum or 0
            sums = torch.stack(
                [ce, wrong.double(), ce.new_tensor(float(n)), ce.new_tensor(float(signum))]
            )
            torch.distributed.all_reduce(sums)
            ce, wrong = sums[0], sums[1].round().long()
            n = int(sums[2].item())
            if sums[3].item() > 0:
                self.stop_signum = signum or signal.SIGTERM
        if out.took_step:  # skipped steps (non-finite loss/gradients) are not averaged
            if self.ema is not None:
                self.ema.update(self.model)
            stats = self.stats
            stats.seen += n
            self.images_trained += n
            stats.loss_sum += ce
            stats.wrong_sum += wrong
            if out.grad_norm is not None:
                stats.grad_norm_sum += out.grad_norm.double()
                stats.grad_norm_count += 1

    def _interrupted(self) -> None:
        path = self._save()
        signum = self._stop_requested()
        assert signum is not None
        raise TrainingInterrupted(signum, path)

    def _evaluate(self) -> dict[str, float]:
        delay = float(os.environ.get(EVAL_DELAY_ENV, "0") or 0)
        if delay:  # testing hook, not counted in eval_seconds
            self.log(f"{EVAL_DELAY_ENV}: evaluating in {delay:g} s")
            time.sleep(delay)
        t0 = time.perf_counter()
        model = self.model
        if self.ema is not None:
            self.eval_copy.load_state_dict(self.ema.state_dict())
            model = self.eval_copy
        if self.dist is not None:
            # Rank 0's BatchNorm statistics (and EMA) are the checkpointed ones: evaluate those.
            for tensor in model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        result = evaluate_model(
            model,
            self.eval_loader,
            self.memory_format,
            self.cfg.compute_top_5_error_rate,
            all_reduce=self.dist is not None,
        )
        self.eval_seconds += time.perf_counter() - t0
        if not math.isfinite(result["loss"]):
            raise TrainingDivergedError(
                f"training diverged: the test loss is {result['loss']}; try a smaller "
                "--learning-rate"
            )
        return result

    def _epoch_record(self, partial: bool) -> dict[str, Any]:
        stats = self.stats
        if stats.seen == 0 or not math.isfinite(stats.loss_sum.item()):
            raise TrainingDivergedError(
                f"training diverged in epoch {self.epoch + 1}: every step had a non-finite loss "
                "or gradient; try a smaller --learning-rate"
            )
        with torch.no_grad():
            param_norm = torch.linalg.vector_norm(
                torch.stack([p.detach().float().norm(2) for p in self.model.parameters()])
            ).item()
        record: dict[str, Any] = {
            "epoch": self.epoch + 1,
            "step": self.global_step,
            "learning_rate": self.schedule.lr(),
            "train_loss": stats.loss_sum.item() / stats.seen,
            "train_error_rate": stats.wrong_sum.item() / stats.seen,
            "gradient_norm": stats.grad_norm_sum.item() / max(1, stats.grad_norm_count),
            "param_norm": param_norm,
            "skipped_steps": self.step_fn.skipped_steps,
            "epoch_seconds": stats.seconds,
            "images_per_sec": stats.seen / stats.seconds if stats.seconds > 0 else None,
        }
        if partial:
            record["partial_epoch"] = True
        return record

    def _add_eval(self, record: dict[str, Any]) -> None:
        result = self._evaluate()
        record["test_loss"] = result["loss"]
        record["test_error_rate"] = result["error_rate"]
        record["test_accuracy"] = result["accuracy"]
        if "top_5_error_rate" in result:
            record["test_top_5_error_rate"] = result["top_5_error_rate"]

    def _publish(self, record: dict[str, Any]) -> None:
        record["wall_seconds"] = time.perf_counter() - self.wall_start
        self._append_metrics(record)
        tags = (
            "train_loss",
            "train_error_rate",
            "gradient_norm",
            "param_norm",
            "learning_rate",
            "test_loss",
            "test_error_rate",
            "test_top_5_error_rate",
            "images_per_sec",
        )
        self.scalars.add({k: record[k] for k in tags if k in record}, self.global_step)
        text = (
            f"epoch {record['epoch']:>3}/{self.cfg.num_epochs}"
            f"{' (partial)' if record.get('partial_epoch') else ''}  "
            f"train loss {record['train_loss']:.4f} err {record['train_error_rate']:.2%}"
        )
        if "test_loss" in record:
            text += f"  test loss {record['test_loss']:.4f} err {record['test_error_rate']:.2%}"
        if record["images_per_sec"]:
            text += f"  ({record['epoch_seconds']:.0f}s, {record['images_per_sec']:.0f} img/s)"
        self.log(text)

    def _end_epoch(self) -> None:
        cfg = self.cfg
        record = self._epoch_record(partial=False)
        epoch1 = self.epoch + 1
        if epoch1 % cfg.evaluate_every == 0 or epoch1 == cfg.num_epochs:
            self._add_eval(record)
        self.train_seconds += self.stats.seconds
        self.history.append(record)
        self._publish(record)
        self.epoch += 1
        self.batch = 0
        self.stats = _EpochStats(self.device)
        self._save()

    def _finish(self) -> dict[str, Any]:
        cfg = self.cfg
        partial = None
        if self.stop_reason == "max_steps" and self.stats.seen:
            # Stopped mid-epoch: report what that partial epoch did (not kept for a resume).
            partial = self._epoch_record(partial=True)
            self._add_eval(partial)
        evaluated = [r for r in self.history if "test_error_rate" in r]
        final = partial or (evaluated[-1] if evaluated else None)
        if final is None or "test_error_rate" not in final:
            final = {"epoch": self.epoch, "step": self.global_step}
            self._add_eval(final)
        # A signal during the final evaluation: save and stop (all ranks at this point) as during
        # training; rerunning the command resumes and only evaluates and writes the summary.
        if self._agree_on_stop() is not None:
            self._interrupted()
        if partial is not None:
            self._publish(partial)
        best = min(
            evaluated + ([partial] if partial else []),
            key=lambda r: r["test_error_rate"],
            default=final,
        )
        train_seconds = self.train_seconds + (partial["epoch_seconds"] if partial else 0.0)
        summary: dict[str, Any] = {
            "status": self.stop_reason,
            "config": cfg.to_dict(),
            "run_dir": str(self.run_dir),
            "dataset": cfg.dataset,
            "model": cfg.model_name,
            "num_parameters": self.num_params,
            "optimizer": describe_optimizer(cfg),
            "epochs_completed": len(self.history),
            "steps": self.global_step,
            "skipped_steps": self.step_fn.skipped_steps,
            "eval_split": "test" if cfg.use_test_set else "holdout",
            "final_test_error_rate": final["test_error_rate"],
            "final_test_accuracy": final["test_accuracy"],
            "final_test_loss": final["test_loss"],
            "best_test_error_rate": best["test_error_rate"],
            "best_test_accuracy": best["test_accuracy"],
            "best_epoch": best.get("epoch"),
            "train_seconds": train_seconds,
            "eval_seconds": self.eval_seconds,
            "images_trained": self.images_trained,
            "images_per_sec": self.images_trained / train_seconds if train_seconds > 0 else None,
            "wall_seconds": time.perf_counter() - self.wall_start,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "device": str(self.device),
            "num_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
        }
        if "test_top_5_error_rate" in final:
            summary["final_test_top_5_error_rate"] = final["test_top_5_error_rate"]
            summary["best_test_top_5_error_rate"] = min(
                r.get("test_top_5_error_rate", 1.0) for r in evaluated + [final]
            )
        if self.dist is not None:
            summary["world_size"] = self.world_size
            summary["sync_perturbations"] = cfg.sync_perturbations
            summary["sync_bn"] = cfg.sync_bn
        if self.is_main:
            write_json(self.run_dir / SUMMARY_FILE, summary)
        stopped = " (stopped by --max-steps)" if self.stop_reason == "max_steps" else ""
        self.log(
            f"final test accuracy {final['test_accuracy']:.2%} (error "
            f"{final['test_error_rate']:.2%}) after {self.global_step} steps{stopped}, "
            f"{summary['wall_seconds']:.0f}s; results in {self.run_dir}"
        )
        return summary
