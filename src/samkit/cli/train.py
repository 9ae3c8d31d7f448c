"""``samkit train`` and ``samkit evaluate``.

``samkit train``'s parser is derived from :class:`~samkit.train.config.TrainConfig`: each field
is a flag with a kebab-case name, the seed system's snake_case spelling as an alias (so the seed
README's command runs as written), its help, domain and default. Boolean flags also accept the
seed's ``--flag true|false`` and ``--noflag`` forms. Settings that only make sense together are
checked in :func:`config_from_args`; bad values give one line naming the flag and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from samkit.cli.args import (
    BoolFlag,
    CommandError,
    HelpFormatter,
    check_device,
    fail,
    number,
    repeats_local_rank_zero,
)
from samkit.data import DataFormatError, DataNotFoundError
from samkit.domains import BATCH, THREADS
from samkit.rundir import CheckpointError, RunDirBusy
from samkit.train.checks import config_from_values
from samkit.train.config import SEED_DEFAULTS, SettingField, TrainConfig, settings
from samkit.train.errors import ConfigError, TrainingDivergedError, TrainingInterrupted
from samkit.train.evaluate import evaluate_run
from samkit.train.hooks import TrainHooks
from samkit.train.loop import train

__all__ = [
    "add_evaluate_command",
    "add_train_command",
    "config_from_args",
    "train_flags",
]

TRAIN_DESCRIPTION = """\
Train a model with SAM (or another optimizer of the registry, or plain SGD), as the seed system
google-research/sam does, on PyTorch. With no flags this is the main job: SAM (rho 0.05) on
Fashion-MNIST with a small ResNet, on the CPU, about 5 minutes on 2 cores, ~93% test accuracy.
Outputs go to OUTPUT_DIR/lr_{lr}/wd_{wd}/rho_{rho}/seed_{seed}/ (config.json, metrics.jsonl,
summary.json, TensorBoard scalars, checkpoints/); rerunning the same command resumes from the
latest checkpoint.

Flags take kebab-case names; the seed's snake_case spellings are accepted too, so
`samkit train --dataset cifar10 --model_name WideResnet28x10 --output_dir DIR
--image_level_augmentations autoaugment --num_epochs 1800 --sam_rho 0.05` runs as written.
Where our default differs from the seed's, the help says so: the seed's defaults (CIFAR-10,
WRN-28-10, 200 epochs, weight decay 0.001 in the loss, gradient clipping 5, rho 0 = SGD, basic
augmentation) describe a GPU experiment; ours are the CPU main job's. See docs/train.md.
"""


def train_flags(field: SettingField) -> tuple[list[str], list[str]]:
    """``(option strings, negative option strings)`` of a setting: ``--name``, the seed's
    spelling, the aliases; for booleans ``--no-name`` and the seed's ``--noname``."""
    setting = field.setting
    names = [field.flag, *([setting.seed] if setting.seed else [])]
    names += [a for a in setting.aliases if a not in names]
    negatives: list[str] = []
    if field.kind is bool:
        negatives = [f"--no-{field.flag[2:]}"]
        if setting.seed:
            negatives.append(f"--no{setting.seed[2:]}")
    return names, negatives


def _help(field: SettingField) -> str:
    """The setting's help, then (seed: --x; also --y; default: D; the seed's default: S)."""
    setting = field.setting
    text = setting.help
    if field.name == "sam_rho":
        text += f" (default: {field.default}, 0 with --optimizer sgd)"
    notes = []
    if setting.seed:
        notes.append(f"seed: {setting.seed}")
    if setting.aliases:
        notes.append("also " + ", ".join(setting.aliases))
    default = field.flag_default
    if "(default" not in text and not (field.kind is bool and default is None):
        notes.append(f"default: {'none' if default is None else default}")
    if field.name in SEED_DEFAULTS:
        notes.append(f"the seed's default: {SEED_DEFAULTS[field.name]}")
    if notes:
        text = f"{text} ({'; '.join(notes)})"
    return text.replace("%", "%%")


def _add_setting(group: argparse._ArgumentGroup, field: SettingField) -> None:
    setting = field.setting
    names, negatives = train_flags(field)
    kw: dict = {"dest": field.name, "default": field.flag_default, "help": _help(field)}
    if field.kind is bool:
        group.add_argument(*names, action=BoolFlag, negatives=negatives, **kw)
        return
    if setting.metavar:
        kw["metavar"] = setting.metavar
    if setting.choices is not None:
        kw["choices"] = tuple(setting.choices)
    elif field.kind in (int, float):
        assert setting.domain is not None, f"{field.name}: a number needs a domain"
        kw["type"] = number(field.kind, setting.domain)
    group.add_argument(*names, **kw)


def add_train_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train a model with SAM / ESAM / SGD (no flags: the Fashion-MNIST main job)",
        description=TRAIN_DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    _add_train_arguments(p)
    p.set_defaults(func=run_train)
    return p


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in settings():
        if field.setting.is_flag:
            group = groups.get(field.setting.group)
            if group is None:
                group = groups[field.setting.group] = p.add_argument_group(field.setting.group)
            _add_setting(group, field)


# --------------------------------------------------------------------------------------------
# Flags -> TrainConfig
# --------------------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of the parsed flags, after the checks of
    :func:`samkit.train.checks.config_from_values`; :class:`CommandError` names the flag."""
    # only what was given (a default is what config_from_values starts from anyway), so that a
    # flag without effect in this run (--momentum over AdamW) can be refused
    values = {
        f.name: getattr(args, f.name)
        for f in settings()
        if f.setting.is_flag and getattr(args, f.name) != f.flag_default
    }
    try:
        return config_from_values(values)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None


def _os_error(exc: OSError) -> str:
    if exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    return str(exc)


def run_train(args: argparse.Namespace, hooks: TrainHooks | None = None) -> int:
    try:
        cfg = config_from_args(args)
    except CommandError as exc:
        return 2 if repeats_local_rank_zero() else fail("train", exc)
    try:
        train(cfg, hooks=hooks)
    except (DataNotFoundError, DataFormatError, ConfigError, RunDirBusy) as exc:
        return fail("train", exc)
    except CheckpointError as exc:
        return fail("train", f"{exc} (use --no-resume to start over)")
    except TrainingDivergedError as exc:
        return fail("train", exc, code=1)
    except TrainingInterrupted as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 speaks (and saves)
            print(f"samkit train: {exc}; run the same command again to resume", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:  # before the loop started, or a second Ctrl-C
        return fail(
            "train",
            "interrupted; nothing saved by this interruption (rerunning the command resumes "
            "from the run's latest checkpoint, if any)",
            code=130,
        )
    except OSError as exc:  # e.g. an output directory that cannot be written
        return fail("train", _os_error(exc), code=1)
    except Exception as exc:
        if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise
        # Under torchrun: a clear one-line error and a nonzero exit, so that torchrun stops the
        # other ranks (they fail in their next collective, or at --dist-timeout at the latest).
        return fail("train", f"rank {os.environ['RANK']}: {type(exc).__name__}: {exc}", code=1)
    return 0


# --------------------------------------------------------------------------------------------
# samkit evaluate
# --------------------------------------------------------------------------------------------


def add_evaluate_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate",
        help="re-evaluate a training run's checkpoint on the test set",
        description=(
            "Rebuild a run's model from RUN_DIR/config.json, load its latest good checkpoint (or "
            "the CHECKPOINT file given) and evaluate it on the test set: prints JSON with the "
            "error rate, loss and, if asked (or if the run computed it), the top-5 error rate. "
            "With EMA (--ema-decay) the averaged weights are evaluated, as during training."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("path", metavar="RUN_DIR|CHECKPOINT", help="a run directory or checkpoint")
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="where the data set is (default: the run's --data-dir, then the usual search)",
    )
    p.add_argument(
        "--split",
        choices=("test", "holdout"),
        default="test",
        help="test set, or the run's 10%% training holdout (runs with --use-test-set false)",
    )
    p.add_argument(
        "--compute-top-5-error-rate",
        "--compute_top_5_error_rate",
        "--top5",
        action=BoolFlag,
        negatives=("--no-compute-top-5-error-rate",),
        default=None,
        help="also report the top-5 error rate (default: as the run did; seed: "
        "--compute_top_5_error_rate; also --top5)",
    )
    p.add_argument(
        "--batch-size",
        metavar="N",
        type=number(int, BATCH),
        default=None,
        help="evaluation batch size (default: the run's)",
    )
    p.add_argument(
        "--weights",
        choices=("auto", "ema", "model"),
        default="auto",
        help="auto: the EMA weights if the run kept them, else the model's",
    )
    p.add_argument("--device", metavar="DEVICE", default="cpu", help="torch device")
    p.add_argument(
        "--threads",
        metavar="N",
        type=number(int, THREADS),
        default=None,
        help="CPU threads (default: the run's --threads, for bit-identical results)",
    )
    p.add_argument("--output", metavar="FILE", default=None, help="also write the JSON to FILE")
    p.set_defaults(func=run_evaluate)
    return p


def run_evaluate(args: argparse.Namespace) -> int:
    problem = check_device(args.device)
    if problem:
        return fail("evaluate", problem)
    if not Path(args.path).exists():
        return fail("evaluate", f"{args.path}: no such run directory or checkpoint file")
    if args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir():
        return fail("evaluate", f"--data-dir {args.data_dir}: no such directory")
    try:
        result = evaluate_run(
            args.path,
            data_dir=args.data_dir,
            split=args.split,
            top5=args.compute_top_5_error_rate,
            batch_size=args.batch_size,
            weights=args.weights,
            device=args.device,
            threads=args.threads,
        )
    except (DataNotFoundError, DataFormatError, CheckpointError, ValueError) as exc:
        return fail("evaluate", exc)
    except TrainingDivergedError as exc:  # a run that diverged: no number to report
        return fail("evaluate", exc, code=1)
    except OSError as exc:
        return fail("evaluate", _os_error(exc))
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        try:
            Path(args.output).write_text(text + "\n")
        except OSError as exc:
            return fail("evaluate", f"--output: {_os_error(exc)}", code=1)
    return 0
