"""``samkit train`` and ``samkit evaluate``: their flags, validation and error reporting.

Every flag has a kebab-case name and, where the seed system (google-research/sam) has it, the
seed's snake_case spelling as an alias, so that the seed README's command runs as written. Boolean
flags also accept the seed's ``--flag true|false`` form. Bad values give one line naming the flag
and exit status 2. Heavy imports (torch) happen only when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from samkit.cli import (
    _number,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    repeats_local_rank_zero,
)
from samkit.train.config import SEED_DEFAULTS, TrainConfig

__all__ = ["add_evaluate_command", "add_train_command"]

_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


class BoolFlag(argparse.Action):
    """``--flag`` / ``--flag true|false`` / ``--no-flag`` (and the seed's ``--noflag``)."""

    def __init__(self, option_strings, dest, default=None, help=None, negatives=()):
        self.negatives = tuple(negatives)
        super().__init__(
            list(option_strings) + list(self.negatives),
            dest,
            nargs="?",
            const=None,
            default=default,
            help=help,
            metavar="BOOL",
        )

    def __call__(self, parser, namespace, values, option_string=None):
        negative = option_string in self.negatives
        if values is None:
            value = not negative
        elif negative:
            raise argparse.ArgumentError(self, "takes no value")
        else:
            try:
                value = parse_bool(values)
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentError(self, str(exc)) from None
        setattr(namespace, self.dest, value)


unit_interval = _number(float, lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
half_open_unit = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
open_closed_unit = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _help_formatter():
    from samkit.cli import _HelpFormatter

    class Formatter(argparse.RawDescriptionHelpFormatter, _HelpFormatter):
        """One option string per flag in the listing (aliases are named in the help text)."""

        def _format_action_invocation(self, action: argparse.Action) -> str:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                return super()._format_action_invocation(action)
            first = action.option_strings[0]
            if action.nargs == 0:
                return first
            if isinstance(action, BoolFlag):
                return f"{first} [BOOL]"
            default = self._get_default_metavar_for_optional(action)
            return f"{first} {self._format_args(action, default)}"

    return Formatter


def _add(group, name: str, *aliases: str, seed: str | None = None, **kw) -> argparse.Action:
    """Add ``--name`` with its aliases; the help names the aliases, our default and the seed's."""
    dest = name.lstrip("-").replace("-", "_")
    kw.setdefault("dest", dest)
    help_text = kw.pop("help", "")
    notes = []
    also = [a for a in aliases if a != seed]
    if seed:
        notes.append(f"seed: {seed}")
    if also:
        notes.append("also " + ", ".join(also))
    default = kw.get("default")
    if kw.get("action") is not BoolFlag or default is not None:
        shown = default if default is not None else "none"
        if "(default" not in help_text:
            notes.append(f"default: {shown}")
    if kw["dest"] in SEED_DEFAULTS:
        notes.append(f"the seed's default: {SEED_DEFAULTS[kw['dest']]}")
    if notes:
        help_text = f"{help_text} ({'; '.join(notes)})"
    option_strings = [name, *([seed] if seed else []), *also]
    return group.add_argument(*option_strings, help=help_text, **kw)


TRAIN_DESCRIPTION = """\
Train a model with SAM (or ESAM, or plain SGD), as the seed system google-research/sam does, on
PyTorch. With no flags this is the main job: SAM (rho 0.05) on Fashion-MNIST with a small ResNet,
on the CPU, about 5 minutes on 2 cores, ~93% test accuracy. Outputs go to
OUTPUT_DIR/lr_{lr}/wd_{wd}/rho_{rho}/seed_{seed}/ (config.json, metrics.jsonl, summary.json,
TensorBoard scalars, checkpoints/); rerunning the same command resumes from the latest checkpoint.

Flags take kebab-case names; the seed's snake_case spellings are accepted too, so
`samkit train --dataset cifar10 --model_name WideResnet28x10 --output_dir DIR
--image_level_augmentations autoaugment --num_epochs 1800 --sam_rho 0.05` runs as written.
Where our default differs from the seed's, the help says so: the seed's defaults (CIFAR-10,
WRN-28-10, 200 epochs, weight decay 0.001 in the loss, gradient clipping 5, rho 0 = SGD, basic
augmentation) describe a GPU experiment; ours are the CPU main job's. See docs/train.md.
"""


def add_train_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from samkit.data.registry import DATASETS
    from samkit.data.transforms import BATCH_LEVEL, IMAGE_LEVEL

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a model with SAM / ESAM / SGD (no flags: the Fashion-MNIST main job)",
        description=TRAIN_DESCRIPTION,
        formatter_class=_help_formatter(),
    )
    g = p.add_argument_group("what is trained")
    _add(
        g,
        "--dataset",
        seed="--dataset",
        choices=sorted(DATASETS),
        default=d.dataset,
        help="data set",
    )
    _add(
        g,
        "--model-name",
        "--model",
        seed="--model_name",
        metavar="NAME",
        default=d.model_name,
        help="model from the registry (samkit.models.list_models(); also any wrn_{depth}_{k})",
    )
    _add(
        g,
        "--num-epochs",
        "--epochs",
        seed="--num_epochs",
        metavar="N",
        type=positive_int,
        default=d.num_epochs,
        help="training epochs",
    )
    _add(
        g,
        "--batch-size",
        seed="--batch_size",
        metavar="N",
        type=positive_int,
        default=d.batch_size,
        help="training batch size",
    )
    _add(
        g,
        "--train-subset",
        metavar="N",
        type=positive_int,
        default=None,
        help="train on the first N training images only",
    )
    _add(
        g,
        "--max-steps",
        metavar="N",
        type=positive_int,
        default=None,
        help="stop after N optimizer steps in total, evaluate and write the summary; the "
        "learning-rate schedule still spans --num-epochs (for smoke tests)",
    )

    g = p.add_argument_group("optimisation")
    _add(
        g,
        "--optimizer",
        choices=("sgd", "sam", "esam"),
        default=d.optimizer,
        help="sharpness-aware optimizer over SGD; sam/esam with --sam-rho 0 is plain SGD",
    )
    _add(
        g,
        "--sam-rho",
        seed="--sam_rho",
        metavar="RHO",
        type=non_negative_float,
        default=None,
        help=f"SAM neighbourhood size rho; 0 trains with plain SGD (default: {d.sam_rho}, "
        "0 with --optimizer sgd)",
    )
    _add(
        g,
        "--sam-m",
        metavar="M",
        type=positive_int,
        default=None,
        help="m-sharpness: a separate perturbation per chunk of M samples (default: the batch; "
        "under torchrun each process's share of the batch)",
    )
    _add(
        g,
        "--sync-perturbations",
        action=BoolFlag,
        negatives=("--no-sync-perturbations",),
        default=d.sync_perturbations,
        help="under torchrun: all-reduce the first-pass gradients so every process perturbs with "
        "the global batch's gradient (default: each process perturbs with its own share, "
        "m = per-process batch, as the SAM paper)",
    )
    _add(
        g,
        "--sync-bn",
        action=BoolFlag,
        negatives=("--no-sync-bn",),
        default=d.sync_bn,
        help="under torchrun: convert BatchNorm layers to torch.nn.SyncBatchNorm, so they "
        "normalise over the global batch (CUDA devices only; refused on the CPU; no effect "
        "in one process)",
    )
    _add(
        g,
        "--sam-adaptive",
        action=BoolFlag,
        negatives=("--no-sam-adaptive",),
        default=d.sam_adaptive,
        help="adaptive SAM (ASAM, Kwon et al. 2021)",
    )
    _add(
        g,
        "--esam-beta",
        metavar="BETA",
        type=open_closed_unit,
        default=d.esam_beta,
        help="ESAM: probability that a parameter tensor joins the perturbation (SWP)",
    )
    _add(
        g,
        "--esam-gamma",
        metavar="GAMMA",
        type=open_closed_unit,
        default=d.esam_gamma,
        help="ESAM: fraction of the batch kept for the second pass (SDS)",
    )
    _add(
        g,
        "--esam-criterion",
        choices=("sharpness", "loss"),
        default=d.esam_criterion,
        help="ESAM: rank samples by loss increase at w+e (sharpness) or by loss",
    )
    _add(
        g,
        "--learning-rate",
        seed="--learning_rate",
        metavar="LR",
        type=positive_float,
        default=d.learning_rate,
        help="peak learning rate; cosine decay to 0, updated every step",
    )
    _add(g, "--momentum", metavar="M", type=half_open_unit, default=d.momentum, help="SGD momentum")
    _add(
        g,
        "--nesterov",
        action=BoolFlag,
        negatives=("--no-nesterov",),
        default=d.nesterov,
        help="Nesterov momentum (the seed always uses it)",
    )
    _add(
        g,
        "--weight-decay",
        seed="--weight_decay",
        metavar="WD",
        type=non_negative_float,
        default=d.weight_decay,
        help="weight decay of all parameters",
    )
    _add(
        g,
        "--weight-decay-mode",
        choices=("decoupled", "loss"),
        default=d.weight_decay_mode,
        help="decoupled: in the base SGD step (outside the perturbation); loss: the seed's "
        "0.5 * wd * ||w||^2 added to the loss, so it also enters the perturbation",
    )
    _add(
        g,
        "--gradient-clipping",
        seed="--gradient_clipping",
        metavar="NORM",
        type=non_negative_float,
        default=0.0,
        help="clip the (SAM) gradient to this global norm; 0 = off",
    )
    _add(
        g,
        "--label-smoothing",
        seed="--label_smoothing",
        metavar="EPS",
        type=half_open_unit,
        default=d.label_smoothing,
        help="label smoothing of the training loss",
    )
    _add(
        g,
        "--ema-decay",
        seed="--ema_decay",
        metavar="DECAY",
        type=half_open_unit,
        default=d.ema_decay,
        help="if > 0, keep an exponential moving average of the weights and evaluate it",
    )
    _add(
        g,
        "--amp",
        choices=("none", "bf16", "fp16"),
        default=d.amp,
        help="mixed precision (fp16 with a gradient scaler)",
    )
    _add(
        g,
        "--run-seed",
        seed="--run_seed",
        metavar="SEED",
        type=non_negative_int,
        default=d.run_seed,
        help="seed of the initialisation, data order, augmentation, noise",
    )

    g = p.add_argument_group("data")
    _add(
        g,
        "--data-dir",
        seed=None,
        metavar="DIR",
        default=None,
        help="where the data set is (searched without it: $SAMKIT_DATA, "
        "~/.cache/samkit/<dataset>, and for Fashion-MNIST /usr/share/datasets/fashion-mnist)",
    )
    _add(
        g,
        "--use-test-set",
        seed="--use_test_set",
        action=BoolFlag,
        negatives=("--no-use-test-set", "--nouse_test_set"),
        default=d.use_test_set,
        help="evaluate on the test set; false: on a 10%% holdout of the training set",
    )
    _add(
        g,
        "--image-level-augmentations",
        "--augment",
        seed="--image_level_augmentations",
        choices=IMAGE_LEVEL,
        default=d.image_level_augmentations,
        help="basic: flip + reflect-pad 4 + crop; autoaugment: AutoAugment then basic "
        "(RandAugment(2, 9) + inception crop for imagenet/image_folder); aa-only: SVHN",
    )
    _add(
        g,
        "--batch-level-augmentations",
        seed="--batch_level_augmentations",
        choices=BATCH_LEVEL,
        default=d.batch_level_augmentations,
        help="cutout after normalising",
    )
    _add(
        g,
        "--cutout-length",
        seed="--cutout_length",
        metavar="PX",
        type=positive_int,
        default=d.cutout_length,
        help="side of the cutout square",
    )
    _add(
        g,
        "--image-size",
        metavar="PX",
        type=positive_int,
        default=None,
        help="crop size for imagenet / image_folder (default: 224)",
    )
    _add(
        g,
        "--label-noise",
        metavar="FRACTION",
        type=unit_interval,
        default=d.label_noise,
        help="flip this fraction of the training labels to another class (seeded, recorded in "
        "label_noise.json; the test set stays clean)",
    )
    _add(
        g,
        "--bootstrap-from",
        metavar="RUN_DIR",
        default=None,
        help="relabel the training set with the predictions of that finished run's model, then "
        "train from scratch",
    )
    _add(
        g,
        "--workers",
        metavar="N",
        type=non_negative_int,
        default=d.workers,
        help="data-loading worker processes (only for per-image augmentation and folders)",
    )

    g = p.add_argument_group("fine-tuning")
    _add(
        g,
        "--from-pretrained-checkpoint",
        seed="--from_pretrained_checkpoint",
        action=BoolFlag,
        negatives=("--no-from-pretrained-checkpoint",),
        default=None,
        help="start from the weights in --pretrained-checkpoint (default: true when that is given)",
    )
    _add(
        g,
        "--pretrained-checkpoint",
        "--efficientnet-checkpoint-path",
        seed="--efficientnet_checkpoint_path",
        metavar="FILE",
        default=None,
        help="a LOCAL state_dict (or samkit checkpoint) file; a head with another class count "
        "is replaced by a new one",
    )
    _add(
        g,
        "--freeze-bn-stats",
        action=BoolFlag,
        negatives=("--no-freeze-bn-stats",),
        default=d.freeze_bn_stats,
        help="keep the BatchNorm running statistics fixed",
    )

    g = p.add_argument_group("evaluation")
    _add(
        g,
        "--evaluate-every",
        seed="--evaluate_every",
        metavar="EPOCHS",
        type=positive_int,
        default=d.evaluate_every,
        help="evaluate every N epochs (and after the last)",
    )
    _add(
        g,
        "--compute-top-5-error-rate",
        seed="--compute_top_5_error_rate",
        action=BoolFlag,
        negatives=("--no-compute-top-5-error-rate",),
        default=d.compute_top_5_error_rate,
        help="also report the top-5 error rate",
    )
    _add(
        g,
        "--eval-batch-size",
        metavar="N",
        type=positive_int,
        default=None,
        help="evaluation batch size (default: 1000, or --batch-size for image folders)",
    )

    g = p.add_argument_group("outputs, checkpoints, machine")
    _add(
        g,
        "--output-dir",
        seed="--output_dir",
        metavar="DIR",
        default=d.output_dir,
        help="runs go to DIR/lr_{lr}/wd_{wd}/rho_{rho}/seed_{seed}/",
    )
    _add(
        g,
        "--run-dir",
        metavar="DIR",
        default=None,
        help="write the run exactly here instead of the nested layout under --output-dir",
    )
    _add(
        g,
        "--save-progress-seconds",
        seed="--save_progress_seconds",
        metavar="S",
        type=non_negative_float,
        default=d.save_progress_seconds,
        help="also checkpoint every S seconds within an epoch (checkpoints are always written at "
        "each epoch end and on Ctrl-C / SIGTERM; 2 are kept)",
    )
    _add(
        g,
        "--resume",
        action=BoolFlag,
        negatives=("--no-resume",),
        default=d.resume,
        help="continue from the run directory's latest good checkpoint; --no-resume discards "
        "its checkpoints and starts over",
    )
    _add(g, "--device", metavar="DEVICE", default=d.device, help="torch device: cpu, cuda, cuda:1")
    _add(
        g,
        "--threads",
        metavar="N",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's choice, one per core); on a machine shared "
        "with other busy processes --threads 1 avoids a steep slowdown",
    )
    _add(
        g,
        "--tensorboard",
        action=BoolFlag,
        negatives=("--no-tensorboard",),
        default=d.tensorboard,
        help="write TensorBoard scalars",
    )
    _add(
        g,
        "--progress",
        action=BoolFlag,
        negatives=("--no-progress",),
        default=None,
        help="show a progress bar (default: only on a terminal)",
    )
    _add(
        g,
        "--dist-timeout",
        metavar="S",
        type=positive_float,
        default=d.dist_timeout,
        help="under torchrun: seconds a collective operation waits for the other processes "
        "before the job fails",
    )
    p.set_defaults(func=run_train)
    return p


# --------------------------------------------------------------------------------------------
# Validation: Namespace -> TrainConfig, with flag-named errors
# --------------------------------------------------------------------------------------------


class UsageError(ValueError):
    """A bad flag value found after parsing; the message starts with the flag."""


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from samkit.cli import _check_device
    from samkit.data.transforms import train_transform
    from samkit.models import is_model, list_models

    if not is_model(args.model_name):
        raise UsageError(
            f"--model-name: unknown model {args.model_name!r}; known: {', '.join(list_models())} "
            "(and any wrn_{depth}_{k})"
        )
    problem = _check_device(args.device)
    if problem:
        raise UsageError(problem)
    try:
        train_transform(
            args.dataset,
            args.image_level_augmentations,
            args.batch_level_augmentations,
            args.cutout_length,
            image_size=args.image_size,
        )
    except ValueError as exc:
        raise UsageError(f"--image-level-augmentations: {exc}") from None
    if args.image_size is not None and args.dataset not in ("imagenet", "image_folder"):
        raise UsageError(f"--image-size: only for imagenet / image_folder, not {args.dataset}")

    optimizer = args.optimizer
    rho = args.sam_rho
    if optimizer == "sgd":
        if rho:
            raise UsageError(f"--sam-rho {rho:g}: has no effect with --optimizer sgd")
        rho = 0.0
    elif rho is None:
        rho = TrainConfig.sam_rho
    if args.sync_perturbations and optimizer == "esam":
        raise UsageError(
            "--sync-perturbations: not supported with --optimizer esam (its weight masks leave "
            "parameters without first-pass gradients to synchronise); use --optimizer sam"
        )
    if args.sam_m is not None and (optimizer == "sgd" or rho == 0):
        raise UsageError("--sam-m: m-sharpness needs --optimizer sam or esam with --sam-rho > 0")

    for flag, value in (("--data-dir", args.data_dir),):
        if value is not None and not Path(value).expanduser().is_dir():
            raise UsageError(f"{flag} {value}: no such directory")
    if args.bootstrap_from is not None:
        source = Path(args.bootstrap_from).expanduser()
        if not source.is_dir():
            raise UsageError(f"--bootstrap-from {args.bootstrap_from}: no such run directory")
        if not (source / "config.json").is_file():
            raise UsageError(
                f"--bootstrap-from {args.bootstrap_from}: not a samkit run directory (no "
                "config.json)"
            )
        if args.label_noise > 0:
            raise UsageError("--label-noise: cannot be combined with --bootstrap-from")

    pretrained = args.from_pretrained_checkpoint
    if pretrained is None:
        pretrained = args.pretrained_checkpoint is not None
    if pretrained:
        if args.pretrained_checkpoint is None:
            raise UsageError(
                "--from-pretrained-checkpoint: needs the checkpoint file, "
                "--pretrained-checkpoint FILE (the seed's --efficientnet_checkpoint_path)"
            )
        if not Path(args.pretrained_checkpoint).expanduser().is_file():
            raise UsageError(f"--pretrained-checkpoint {args.pretrained_checkpoint}: no such file")
    elif args.pretrained_checkpoint is not None:
        raise UsageError(
            "--pretrained-checkpoint: given together with --from-pretrained-checkpoint false"
        )

    return TrainConfig(
        dataset=args.dataset,
        model_name=args.model_name,
        num_epochs=args.num_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        momentum=args.momentum,
        nesterov=args.nesterov,
        weight_decay=args.weight_decay,
        weight_decay_mode=args.weight_decay_mode,
        gradient_clipping=args.gradient_clipping or None,
        label_smoothing=args.label_smoothing,
        ema_decay=args.ema_decay,
        optimizer=optimizer,
        sam_rho=rho,
        sam_m=args.sam_m,
        sam_adaptive=args.sam_adaptive,
        sync_perturbations=args.sync_perturbations,
        sync_bn=args.sync_bn,
        esam_beta=args.esam_beta,
        esam_gamma=args.esam_gamma,
        esam_criterion=args.esam_criterion,
        amp=args.amp,
        run_seed=args.run_seed,
        use_test_set=args.use_test_set,
        image_level_augmentations=args.image_level_augmentations,
        batch_level_augmentations=args.batch_level_augmentations,
        cutout_length=args.cutout_length,
        image_size=args.image_size,
        label_noise=args.label_noise,
        bootstrap_from=args.bootstrap_from,
        train_subset=args.train_subset,
        data_dir=args.data_dir,
        workers=args.workers,
        from_pretrained_checkpoint=pretrained,
        pretrained_checkpoint=args.pretrained_checkpoint if pretrained else None,
        freeze_bn_stats=args.freeze_bn_stats,
        evaluate_every=args.evaluate_every,
        compute_top_5_error_rate=args.compute_top_5_error_rate,
        eval_batch_size=args.eval_batch_size,
        output_dir=args.output_dir,
        run_dir=args.run_dir,
        save_progress_seconds=args.save_progress_seconds,
        resume=args.resume,
        max_steps=args.max_steps,
        device=args.device,
        threads=args.threads,
        tensorboard=args.tensorboard,
        progress=args.progress,
        dist_timeout=args.dist_timeout,
    )


def _fail(command: str, message: str, code: int = 2) -> int:
    first, *rest = str(message).splitlines() or [""]
    print(f"samkit {command}: error: {first}", file=sys.stderr)
    for line in rest:
        print(f"  {line.strip()}", file=sys.stderr)
    return code


def _os_error(exc: OSError) -> str:
    if exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    return str(exc)


def run_train(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except UsageError as exc:
        return 2 if repeats_local_rank_zero() else _fail("train", str(exc))

    from samkit.data import DataFormatError, DataNotFoundError
    from samkit.train.checkpoint import CheckpointError
    from samkit.train.loop import (
        ConfigError,
        TrainingDivergedError,
        TrainingInterrupted,
        train,
    )

    try:
        train(cfg)
    except (DataNotFoundError, DataFormatError, ConfigError) as exc:
        return _fail("train", str(exc))
    except CheckpointError as exc:
        return _fail("train", f"{exc} (use --no-resume to start over)")
    except TrainingDivergedError as exc:
        return _fail("train", str(exc), code=1)
    except TrainingInterrupted as exc:
        import os

        if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 speaks (and saves)
            print(
                f"samkit train: {exc}; run the same command again to resume",
                file=sys.stderr,
            )
        return 128 + exc.signum
    except KeyboardInterrupt:  # before the loop started, or a second Ctrl-C
        return _fail(
            "train",
            "interrupted; nothing saved by this interruption (rerunning the command resumes "
            "from the run's latest checkpoint, if any)",
            code=130,
        )
    except OSError as exc:  # e.g. an output directory that cannot be written
        return _fail("train", _os_error(exc), code=1)
    except Exception as exc:
        import os

        if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise
        # Under torchrun: a clear one-line error and a nonzero exit, so that torchrun stops the
        # other ranks (they fail in their next collective, or at --dist-timeout at the latest).
        return _fail("train", f"rank {os.environ['RANK']}: {type(exc).__name__}: {exc}", code=1)
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
        formatter_class=_help_formatter(),
    )
    p.add_argument("path", metavar="RUN_DIR|CHECKPOINT", help="a run directory or checkpoint")
    _add(
        p,
        "--data-dir",
        metavar="DIR",
        default=None,
        help="where the data set is (default: the run's --data-dir, then the usual search)",
    )
    _add(
        p,
        "--split",
        choices=("test", "holdout"),
        default="test",
        help="test set, or the run's 10%% training holdout (runs with --use-test-set false)",
    )
    _add(
        p,
        "--compute-top-5-error-rate",
        "--top5",
        seed="--compute_top_5_error_rate",
        action=BoolFlag,
        negatives=("--no-compute-top-5-error-rate",),
        default=None,
        help="also report the top-5 error rate (default: as the run did)",
    )
    _add(
        p,
        "--batch-size",
        metavar="N",
        type=positive_int,
        default=None,
        help="evaluation batch size (default: the run's)",
    )
    _add(
        p,
        "--weights",
        choices=("auto", "ema", "model"),
        default="auto",
        help="auto: the EMA weights if the run kept them, else the model's",
    )
    _add(p, "--device", metavar="DEVICE", default="cpu", help="torch device")
    _add(
        p,
        "--threads",
        metavar="N",
        type=positive_int,
        default=None,
        help="CPU threads (default: the run's --threads, for bit-identical results)",
    )
    _add(p, "--output", metavar="FILE", default=None, help="also write the JSON to FILE")
    p.set_defaults(func=run_evaluate)
    return p


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from samkit.cli import _check_device

    problem = _check_device(args.device)
    if problem:
        return _fail("evaluate", problem)
    if not Path(args.path).exists():
        return _fail("evaluate", f"{args.path}: no such run directory or checkpoint file")
    if args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir():
        return _fail("evaluate", f"--data-dir {args.data_dir}: no such directory")

    from samkit.data import DataFormatError, DataNotFoundError
    from samkit.train.checkpoint import CheckpointError
    from samkit.train.evaluate import evaluate_run

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
        return _fail("evaluate", str(exc))
    except OSError as exc:
        return _fail("evaluate", _os_error(exc))
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        try:
            Path(args.output).write_text(text + "\n")
        except OSError as exc:
            return _fail("evaluate", f"--output: {_os_error(exc)}", code=1)
    return 0
