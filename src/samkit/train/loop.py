"""The training loop behind ``samkit train``, to be read top to bottom.

One run trains ``cfg.model_name`` on ``cfg.dataset`` with the chosen optimizer (every step
through :class:`~samkit.train.step.SharpnessAwareStep`), a cosine learning-rate schedule updated
every step, and evaluates after every ``evaluate_every`` epochs. It writes its run directory
(:mod:`samkit.rundir`): ``config.json``, ``metrics.jsonl``, ``summary.json``, TensorBoard
scalars and ``checkpoints/`` (every ``save_progress_seconds`` and at each epoch end, keep 2)
holding everything needed to continue bit for bit: model, optimizer (with momentum), schedule,
step-helper state (GradScaler), EMA, the position in the data order, the epoch's running sums,
the metric history and the RNG states.

A new invocation with the same settings resumes from the latest good checkpoint (a corrupt one is
skipped), so a run killed at any moment and restarted ends with exactly the weights of an
uninterrupted run. SIGINT and SIGTERM save a checkpoint and stop (:class:`TrainingInterrupted`).
Everything is seeded by ``run_seed``: initialisation, data order and augmentation (explicit
generators, see :mod:`samkit.data.loader`), label noise and ESAM's weight masks.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from samkit.data import save_label_noise
from samkit.rundir import (
    BOOTSTRAP_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    RunDirLock,
    append_jsonl,
    write_json,
    write_jsonl,
)
from samkit.rundir import layout as keys
from samkit.train import build, distributed, records, reference
from samkit.train.bootstrap import relabel_from_run
from samkit.train.config import TrainConfig
from samkit.train.ema import EMA
from samkit.train.errors import ConfigError, TrainingDivergedError
from samkit.train.evaluate import evaluate_model
from samkit.train.hooks import TrainHooks
from samkit.train.run import (
    Run,
    check_same_settings,
    discard_checkpoints,
    divergence_message,
    interrupted,
    refuse_foreign_directory,
    resume,
    save,
    set_aside_unusable,
    step_done,
    wall_seconds,
)
from samkit.train.signals import StopSignals
from samkit.train.state import RunState

__all__ = ["train"]


def train(
    cfg: TrainConfig,
    *,
    log: Callable[[str], None] | None = None,
    hooks: TrainHooks | None = None,
) -> dict[str, Any]:
    """Run (or resume) one training job and return its summary (also in ``summary.json``).

    Raises :class:`ConfigError` for settings that cannot work (naming the flag),
    :class:`samkit.data.DataNotFoundError` / :class:`samkit.data.DataFormatError` for missing or
    bad data, :class:`TrainingDivergedError` if the loss stops being finite,
    :class:`TrainingInterrupted` after SIGINT / SIGTERM (a checkpoint was saved) and
    :class:`~samkit.rundir.CheckpointError` when no checkpoint in the run is usable. Under
    torchrun (``RANK`` / ``WORLD_SIZE`` set) it joins the process group and trains with DDP.
    """
    dist = distributed.from_env()
    if dist is not None and not dist.is_main:
        log = lambda msg: None  # noqa: E731 -- only rank 0 talks
    log = log or (lambda msg: tqdm.write(msg, file=sys.stdout))
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    created = succeeded = False
    try:
        device = build.device_for(cfg, dist)
        if dist is not None:
            if cfg.sync_bn and not distributed.sync_bn_supported(device):
                raise ConfigError(
                    f"--sync-bn: torch.nn.SyncBatchNorm does not run on {device.type} (torch "
                    f"{torch.__version__.split('+')[0]} synchronises BatchNorm statistics on "
                    f"{'/'.join(distributed.SYNC_BN_DEVICE_TYPES)} devices only); train with "
                    "--device cuda, or without --sync-bn (each process then normalises over its "
                    "own share of the batch)"
                )
            if device.type == "cuda":
                torch.cuda.set_device(device)
            created = distributed.init_process_group(dist, device, cfg.dist_timeout)
        cfg = build.resolve_paths(cfg)
        run_dir = build.run_dir_for(cfg)
        refuse_foreign_directory(run_dir)
        # One writer per run directory (under torchrun rank 0 writes; the lock is its).
        with RunDirLock(run_dir) if dist is None or dist.is_main else contextlib.nullcontext():
            summary = _train(cfg, device, dist, log, hooks or TrainHooks())
        succeeded = True
        return summary
    finally:
        torch.set_num_threads(threads_before)
        # After success the group stays up: the CLI leaves with os._exit, because gloo's C++
        # teardown races with the other ranks' exits and can abort a finished run (SIGABRT).
        if created and not succeeded:
            torch.distributed.destroy_process_group()


def _train(
    cfg: TrainConfig,
    device: torch.device,
    dist: distributed.DistInfo | None,
    log: Callable[[str], None],
    hooks: TrainHooks,
) -> dict[str, Any]:
    wall_start = time.perf_counter()
    run_dir = build.run_dir_for(cfg)
    if cfg.resume:
        check_same_settings(run_dir, cfg)

    # Data, model, optimizer, training step
    data = build.build_data(cfg, dist)
    bootstrap_record = None
    if cfg.bootstrap_from:
        data.train, bootstrap_record = relabel_from_run(
            cfg.bootstrap_from, data, device, workers=cfg.workers, log=log
        )
    model, sync_bn_layers = build.build_model(cfg, data.info, device, dist, log)
    optimizer = build.build_optimizer(cfg, model)
    amp = build.amp_for(cfg, device, dist)
    trajectory = build.build_trajectory(cfg, model, data, amp)  # SAF, MESA: a term of the loss
    step_fn = build.build_step(cfg, model, optimizer, device, dist, amp=amp, loss_term=trajectory)
    train_loader, eval_loader = build.build_loaders(cfg, data, device, dist)
    schedule = build.build_schedule(cfg, optimizer, len(train_loader))
    policy = getattr(optimizer, "ascent_policy", None)  # AE-SAM, RST, late-phase SAM: the run's
    if policy is not None and policy.total_steps is None:  # length, for their schedules
        policy.total_steps = schedule.total_steps
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    signals = StopSignals(distributed=dist is not None, device=device)
    run = Run(cfg, run_dir, device, dist, model, optimizer, step_fn, schedule, ema,
              train_loader, eval_loader, log, hooks, signals, wall_start=wall_start,
              eval_copy=copy.deepcopy(model) if ema is not None else None,
              trajectory=trajectory)  # fmt: skip

    # Resume from the latest checkpoint, or start over
    state = RunState(device)
    if cfg.resume:
        resume(run, state)
    elif run.is_main:
        discard_checkpoints(run)
    if dist is not None:  # every rank has read the checkpoint before rank 0 writes one
        torch.distributed.barrier()
    if run.is_main:
        set_aside_unusable(run)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / CONFIG_FILE, config_record(run, data, sync_bn_layers))
        noise = getattr(data.train, "label_noise", None)
        if noise is not None:
            save_label_noise(noise, run_dir)
        if bootstrap_record is not None:
            write_json(run_dir / BOOTSTRAP_FILE, bootstrap_record)
        write_jsonl(run_dir / METRICS_FILE, state.history)
    run.scalars = records.Scalars(
        cfg.tensorboard and run.is_main,
        run_dir,
        log,
        purge_step=state.global_step if state.resumed_from else None,
    )
    log(start_line(run, data, state, sync_bn_layers))

    # Train, evaluate, save
    run.last_save = time.monotonic()
    status = keys.COMPLETED
    try:
        # The signal handlers stay installed through the final evaluation and, under torchrun,
        # the last barrier: a signal then must not kill one rank in the middle of a collective.
        with signals:
            while state.epoch < cfg.num_epochs:
                if max_steps_reached(cfg, state) or train_one_epoch(run, state):
                    status = keys.MAX_STEPS
                    break
                end_epoch(run, state)
                if signals.agree() is not None:  # a signal during the epoch-end evaluation
                    interrupted(run, state)
            summary = finish(run, state, status)
            if dist is not None:  # every rank is done before any leaves
                torch.distributed.barrier()
    finally:
        run.scalars.close()
    return summary


def max_steps_reached(cfg: TrainConfig, state: RunState) -> bool:
    return cfg.max_steps is not None and state.global_step >= cfg.max_steps


def train_one_epoch(run: Run, state: RunState) -> bool:
    """Train until the epoch ends (False) or ``--max-steps`` is reached (True, after saving)."""
    cfg, steps_per_epoch = run.cfg, len(run.train_loader)
    run.model.train()
    run.train_loader.set_epoch(state.epoch, start_batch=state.batch)
    batches = iter(run.train_loader)
    bar = tqdm(
        total=steps_per_epoch,
        initial=state.batch,
        desc=f"epoch {state.epoch + 1}/{cfg.num_epochs}",
        leave=False,
        disable=None if cfg.progress is None else not cfg.progress,
        dynamic_ncols=True,
    )
    try:
        while state.batch < steps_per_epoch:
            if max_steps_reached(cfg, state):
                save(run, state)
                return True
            t0 = time.perf_counter()
            x, y, *index = next(batches)  # SAF's loader also yields the samples' indices
            train_step(run, state, x, y, *index)
            state.stats.seconds += time.perf_counter() - t0
            bar.update(1)
            if run.hooks.after_step is not None:
                run.hooks.after_step(state.global_step)
            if state.global_step % 50 == 0 and state.stats.seen:
                running = state.stats.loss_sum.item() / state.stats.seen
                bar.set_postfix(loss=f"{running:.3f}", refresh=False)
                run.scalars.add({keys.LEARNING_RATE: run.schedule.lr()}, state.global_step)
            if run.signals.requested() is not None:
                interrupted(run, state)
            last = state.batch == steps_per_epoch
            if not last and time.monotonic() - run.last_save >= cfg.save_progress_seconds:
                save(run, state)
    finally:
        bar.close()
        if hasattr(batches, "close"):
            batches.close()
    return False


def train_step(
    run: Run, state: RunState, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None
) -> None:
    """One optimizer step on ``x, y`` (under torchrun: this rank's share of the global batch);
    ``index``: the samples' positions in the training set (SAF's)."""
    if run.hooks.before_step is not None:
        run.hooks.before_step(state.global_step + 1)
    run.schedule.apply()
    x = x.contiguous(memory_format=build.memory_format_for(run.device))
    if run.trajectory is not None:  # SAF, MESA: this batch's teacher logits, before the step
        run.trajectory.prepare(x, index, state.epoch)
    out = run.step_fn(x, y)
    if run.trajectory is not None:  # SAF stores the logits, MESA updates its teacher
        run.trajectory.after_step(run.model, out.outputs, bool(out.took_step))
    run.schedule.step()
    state.global_step += 1
    state.batch += 1
    n = y.numel()
    with torch.no_grad():
        loss_sum = F.cross_entropy(out.outputs.float(), y, reduction="sum").double()
        wrong = (out.outputs.argmax(1) != y).sum()
    if run.dist is not None:
        # One small all-reduce per step: the sums over the global batch (identical on every
        # rank, so rank 0's checkpoint is right for all) and whether any rank got a signal.
        sums = torch.stack(
            [
                loss_sum,
                wrong.double(),
                loss_sum.new_tensor(float(n)),
                loss_sum.new_tensor(run.signals.local_flag()),
            ]
        )
        torch.distributed.all_reduce(sums)
        loss_sum, wrong = sums[0], sums[1].round().long()
        n = int(sums[2].item())
        run.signals.note_agreed(sums[3].item())
    if out.took_step:  # skipped steps (non-finite loss or gradients) are not averaged
        if run.ema is not None:
            run.ema.update(run.model)
        state.stats.add(n, loss_sum, wrong, out.grad_norm)
        state.images_trained += n
    step_done(run, state, bool(out.took_step))


def evaluate(run: Run, state: RunState) -> dict[str, Any]:
    """Evaluate the model (its EMA, if kept) on the evaluation set, counting the time."""
    if run.hooks.before_eval is not None:
        run.hooks.before_eval()
    t0 = time.perf_counter()
    model = run.model
    if run.ema is not None:  # evaluated in a copy made once, the trained weights untouched
        model = run.eval_copy
        model.load_state_dict(run.ema.state_dict())
    if run.dist is not None:
        # Rank 0's BatchNorm statistics (and EMA) are the checkpointed ones: evaluate those.
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    result = evaluate_model(
        model,
        run.eval_loader,
        build.memory_format_for(run.device),
        run.cfg.compute_top_5_error_rate,
        all_reduce=run.dist is not None,
    )
    state.eval_seconds += time.perf_counter() - t0
    if not math.isfinite(result["loss"]):
        raise TrainingDivergedError(
            divergence_message(run, state, f"the evaluation loss is {result['loss']}")
        )
    return result


def epoch_record(run: Run, state: RunState, *, partial: bool = False) -> dict[str, Any]:
    skipped = run.step_fn.skipped_steps
    return records.epoch_record(state, run.model, run.schedule.lr(), skipped, partial)


def publish(run: Run, state: RunState, record: dict[str, Any]) -> None:
    """Append ``record`` to metrics.jsonl and TensorBoard, and print its progress line."""
    record[keys.WALL_SECONDS] = wall_seconds(run, state)
    if run.is_main:
        append_jsonl(run.run_dir / METRICS_FILE, record)
    run.scalars.add_record(record, state.global_step)
    run.log(records.progress_line(record, run.cfg.num_epochs))


def end_epoch(run: Run, state: RunState) -> None:
    """Record the finished epoch (evaluating it when due), then checkpoint."""
    record = epoch_record(run, state)
    epoch = state.epoch + 1
    if epoch % run.cfg.evaluate_every == 0 or epoch == run.cfg.num_epochs:
        records.add_evaluation(record, evaluate(run, state))
    state.history.append(record)
    state.next_epoch()
    publish(run, state, record)
    save(run, state)


def finish(run: Run, state: RunState, status: str) -> dict[str, Any]:
    """The final evaluation (of a partial epoch left by --max-steps, if any) and summary.json."""
    if state.global_step > 0 and state.images_trained == 0:
        raise TrainingDivergedError(
            divergence_message(
                run,
                state,
                f"every one of the {state.global_step} steps was skipped (non-finite loss or "
                "gradients): nothing was trained",
            )
        )
    partial = None
    if status == keys.MAX_STEPS and state.stats.seen:
        # Stopped mid-epoch: report what that partial epoch did (not kept for a resume).
        partial = epoch_record(run, state, partial=True)
        records.add_evaluation(partial, evaluate(run, state))
    evaluated = [r for r in state.history if keys.TEST_ERROR_RATE in r]
    final = partial or (evaluated[-1] if evaluated else None)
    if final is None:
        final = {keys.EPOCH: state.epoch, keys.STEP: state.global_step}
        records.add_evaluation(final, evaluate(run, state))
    # A signal during the final evaluation: save and stop (all ranks at this point) as during
    # training; rerunning the command resumes and only evaluates and writes the summary.
    if run.signals.agree() is not None:
        interrupted(run, state)
    if partial is not None:
        publish(run, state, partial)
    cfg = run.cfg
    summary = records.summary(
        state,
        final,
        partial,
        status=status,
        config=cfg.to_dict(),
        run_dir=run.run_dir,
        model_name=cfg.model_name,
        num_parameters=sum(p.numel() for p in run.model.parameters()),
        optimizer=build.describe_optimizer(cfg),
        skipped_steps=run.step_fn.skipped_steps,
        use_test_set=cfg.use_test_set,
        wall_seconds=wall_seconds(run, state),
        device=run.device,
    )
    if run.dist is not None:
        summary.update(
            world_size=run.dist.world_size,
            sync_perturbations=cfg.sync_perturbations,
            sync_bn=cfg.sync_bn,
        )
    # the committed evidence at these settings, if there is some (the main job's defaults)
    world = run.dist.world_size if run.dist is not None else 1
    comparison = reference.compare(cfg.to_dict(), final[keys.TEST_ERROR_RATE], world_size=world)
    if comparison is not None:
        summary["reference"] = comparison
    if run.is_main:
        write_json(run.run_dir / SUMMARY_FILE, summary)
    stopped = " (stopped by --max-steps)" if status == keys.MAX_STEPS else ""
    run.log(
        f"final test accuracy {final[keys.TEST_ACCURACY]:.2%} (error "
        f"{final[keys.TEST_ERROR_RATE]:.2%}) after {state.global_step} steps{stopped}, "
        f"{summary[keys.WALL_SECONDS]:.0f}s; results in {run.run_dir}"
    )
    for line in reference.describe(comparison) if comparison is not None else ():
        run.log(line)
    return summary


# --------------------------------------------------------------------------------------------
# What the run tells: config.json and its first log line
# --------------------------------------------------------------------------------------------


def config_record(run: Run, data: build.Data, sync_bn_layers: int) -> dict[str, Any]:
    """config.json: every resolved setting, what rebuilds the model, and the run's facts."""
    cfg, info = run.cfg, data.info
    memory_format = build.memory_format_for(run.device)
    return {
        **cfg.to_dict(),
        "run_dir": str(run.run_dir),
        # What rebuilds the model (samkit.rundir.load_run_model):
        "model_name": cfg.model_name,
        "num_classes": info.num_classes,
        "in_channels": info.in_channels,
        "dataset": cfg.dataset,
        "model_kwargs": {},
        # Resolved details:
        "effective_sam_rho": cfg.effective_rho,
        "optimizer_description": build.describe_optimizer(cfg),
        "eval_split": "test" if cfg.use_test_set else "holdout",
        "holdout_seed": build.HOLDOUT_SEED,
        "eval_batch_size_resolved": data.eval_batch_size,
        "image_size_resolved": cfg.image_size or info.image_size,
        "classes": list(info.classes) if info.classes is not None else None,
        "train_size": len(data.train),
        "eval_size": len(data.eval),
        "steps_per_epoch": len(run.train_loader),
        "total_steps": run.schedule.total_steps,
        "num_parameters": sum(p.numel() for p in run.model.parameters()),
        "sync_bn_layers": sync_bn_layers,
        "memory_format": "channels_last" if memory_format == torch.channels_last else "contiguous",
        "amp_resolved": precision(run),
        "versions": records.versions(),
        "device_info": records.device_info(run.device),
        "command": sys.argv,
    }


def precision(run: Run) -> str:
    """What ``--amp`` resolved to: ``none`` (float32), ``bf16`` or ``fp16``."""
    names = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names[run.step_fn.amp_dtype]


def start_line(run: Run, data: build.Data, state: RunState, sync_bn_layers: int) -> str:
    cfg, steps = run.cfg, len(run.train_loader)
    where = (
        f"resuming from {state.resumed_from.name} (epoch {state.epoch + 1}, batch "
        f"{state.batch}/{steps})"
        if state.resumed_from
        else "starting"
    )
    processes = ""
    if run.dist is not None:
        world = run.dist.world_size
        processes = f", {world} processes x {cfg.batch_size // world} images"
        processes += " (synced perturbations)" if cfg.sync_perturbations else ""
        processes += " (SyncBatchNorm)" if sync_bn_layers else ""
    num_params = sum(p.numel() for p in run.model.parameters())
    return (
        f"samkit train: {cfg.model_name} ({num_params:,} parameters), "
        f"{build.describe_optimizer(cfg)}, {cfg.dataset}: {len(data.train):,} train / "
        f"{len(data.eval):,} {'test' if cfg.use_test_set else 'holdout'} images, "
        f"{cfg.num_epochs} epochs x {steps} steps, device {run.device}, {precision_text(run)}, "
        f"threads {torch.get_num_threads()}{processes}; {where}; run dir {run.run_dir}"
    )


def precision_text(run: Run) -> str:
    """``bf16 autocast (--amp auto)``, ``float32``, ..."""
    text = {"none": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[precision(run)]
    return text + " (--amp auto)" if run.cfg.amp == "auto" else text
