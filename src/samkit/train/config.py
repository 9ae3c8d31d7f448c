"""Settings of a training run, each defined once: its default, help, domain and flag spellings.

Every field of :class:`TrainConfig` is a ``samkit train`` flag (except ``holdout_fraction``): the
command line (:mod:`samkit.cli.train`) derives its parser from :func:`settings`, and
``docs/train.md``'s flag tables are checked against that parser by the tests. The defaults are
those of ``samkit train`` with no flags: the Fashion-MNIST CPU main job. Where they differ from
the seed system's (google-research/sam) defaults, the field says so (``seed_default``) and
``docs/train.md`` explains why. Options of a sharpness-aware optimizer (``sam_rho``,
``esam_beta``, ...) take their default, help and domain from the optimizer registry.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

from samkit import domains
from samkit.data.registry import DATASETS
from samkit.data.transforms import BATCH_LEVEL, IMAGE_LEVEL
from samkit.domains import Interval
from samkit.models import list_model_families
from samkit.optim.registry import get_optimizer_info, list_optimizers

__all__ = [
    "BASE_LEARNING_RATES", "BASE_OPTIMIZERS", "RESUME_IGNORED", "settings_differences",
    "SEED_DEFAULTS", "Setting", "TrainConfig", "settings",
]  # fmt: skip

_SAME = object()  # the command line's default is the field's own

#: ``--base-optimizer``'s choices, and the command line's learning rate for each.
BASE_OPTIMIZERS = ("sgd", "adamw")
BASE_LEARNING_RATES = {"sgd": 0.1, "adamw": 0.001}


@dataclasses.dataclass(frozen=True)
class Setting:
    """How a :class:`TrainConfig` field appears on the command line and in the docs."""

    help: str
    group: str
    seed: str | None = None  # the seed system's spelling of the flag (an alias here)
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    domain: Interval | None = None  # for numbers
    choices: Sequence[str] | None = None
    seed_default: Any = _SAME  # the seed system's default, where it differs from ours
    affects_training: bool = True  # False: may change when a run is resumed
    flag_default: Any = _SAME  # the parser's default, when it is not the field's
    is_flag: bool = True


def _setting(default: Any, help: str, group: str, **kw: Any) -> Any:
    return dataclasses.field(default=default, metadata={"setting": Setting(help, group, **kw)})


def _optimizer_option(optimizer: str, option: str, group: str, **kw: Any) -> Any:
    """A field whose default, help, domain and choices are the optimizer registry's."""
    opt = get_optimizer_info(optimizer).option(option)
    kw.setdefault("domain", opt.domain)
    kw.setdefault("choices", opt.choices)
    return _setting(opt.default, opt.help, group, **kw)


TRAINED, OPTIMISATION, DATA = "what is trained", "optimisation", "data"
FINE_TUNING, EVALUATION, MACHINE = "fine-tuning", "evaluation", "outputs, checkpoints, machine"


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run (the defaults are those of ``samkit train``)."""

    # What is trained
    dataset: str = _setting(
        "fashion_mnist",
        "data set",
        TRAINED,
        seed="--dataset",
        choices=sorted(DATASETS),
        seed_default="cifar10",
    )
    model_name: str = _setting(
        "resnet_small",
        "model from the registry (samkit.models.list_models(); also any "
        + ", ".join(list_model_families())
        + ")",
        TRAINED,
        seed="--model_name",
        aliases=("--model",),
        metavar="NAME",
        seed_default="WideResnet28x10",
    )
    num_epochs: int = _setting(
        12,
        "training epochs",
        TRAINED,
        seed="--num_epochs",
        aliases=("--epochs",),
        metavar="N",
        domain=domains.EPOCHS,
        seed_default=200,
    )
    batch_size: int = _setting(
        128,
        "training batch size",
        TRAINED,
        seed="--batch_size",
        metavar="N",
        domain=domains.BATCH,
    )
    # Optimisation
    learning_rate: float = _setting(
        0.1,
        "peak learning rate (default: 0.1; 0.001 with --base-optimizer adamw); cosine decay "
        "to 0, updated every step",
        OPTIMISATION,
        seed="--learning_rate",
        metavar="LR",
        domain=domains.POSITIVE_SCALE,
        flag_default=None,  # the default depends on --base-optimizer
    )
    warmup_epochs: float = _setting(
        0.0,
        "linear learning-rate warm-up over the first EPOCHS epochs (fractions allowed, rounded "
        "to whole steps), then the cosine decay over the remaining steps; GSAM's rho_t follows "
        "the warmed-up learning rate",
        OPTIMISATION,
        metavar="EPOCHS",
        domain=Interval(0, domains.MAX_EPOCHS),
    )
    base_optimizer: str = _setting(
        "sgd",
        "the optimizer that steps the weights, wrapped by --optimizer's method (alone with "
        "--optimizer sgd): sgd (momentum, Nesterov: --momentum, --nesterov) or adamw "
        "(--adamw-beta1, --adamw-beta2, --adamw-eps; its decoupled weight decay)",
        OPTIMISATION,
        choices=BASE_OPTIMIZERS,
    )
    momentum: float = _setting(
        0.9, "SGD momentum", OPTIMISATION, metavar="M", domain=domains.UNIT_CLOSED_OPEN
    )
    nesterov: bool = _setting(True, "Nesterov momentum (the seed always uses it)", OPTIMISATION)
    adamw_beta1: float = _setting(
        0.9,
        "AdamW: decay of the moving average of the gradient",
        OPTIMISATION,
        metavar="BETA",
        domain=domains.UNIT_CLOSED_OPEN,
    )
    adamw_beta2: float = _setting(
        0.999,
        "AdamW: decay of the moving average of the squared gradient",
        OPTIMISATION,
        metavar="BETA",
        domain=domains.UNIT_CLOSED_OPEN,
    )
    adamw_eps: float = _setting(
        1e-8,
        "AdamW: added to the denominator (the root of the squared-gradient average)",
        OPTIMISATION,
        metavar="EPS",
        domain=domains.UNIT_OPEN_CLOSED,
    )
    weight_decay: float = _setting(
        5e-4,
        "weight decay of all parameters",
        OPTIMISATION,
        seed="--weight_decay",
        metavar="WD",
        domain=domains.SCALE,
        seed_default=0.001,
    )
    weight_decay_mode: str = _setting(
        "decoupled",
        "decoupled: in the base optimizer's step (SGD's L2 term, AdamW's decoupled decay), "
        "outside the perturbation; loss: the seed's 0.5 * wd * ||w||^2 added to the loss, so "
        "it also enters the perturbation",
        OPTIMISATION,
        choices=("decoupled", "loss"),
        seed_default="loss",
    )
    gradient_clipping: float | None = _setting(
        None,
        "clip the (SAM) gradient to this global norm; 0 = off",
        OPTIMISATION,
        seed="--gradient_clipping",
        metavar="NORM",
        domain=domains.SCALE,
        flag_default=0.0,
        seed_default=5.0,
    )
    label_smoothing: float = _setting(
        0.0,
        "label smoothing of the training loss",
        OPTIMISATION,
        seed="--label_smoothing",
        metavar="EPS",
        domain=domains.UNIT_CLOSED_OPEN,
    )
    ema_decay: float = _setting(
        0.0,
        "if > 0, keep an exponential moving average of the weights and evaluate it",
        OPTIMISATION,
        seed="--ema_decay",
        metavar="DECAY",
        domain=domains.UNIT_CLOSED_OPEN,
    )
    optimizer: str = _setting(
        "sam",
        "; ".join(f"{name}: {get_optimizer_info(name).description}" for name in list_optimizers())
        + " (over --base-optimizer; a sharpness-aware optimizer with --sam-rho 0 is the base "
        "optimizer alone)",
        OPTIMISATION,
        choices=tuple(list_optimizers()),
    )
    sam_rho: float = _optimizer_option(
        "sam",
        "rho",
        OPTIMISATION,
        seed="--sam_rho",
        metavar="RHO",
        flag_default=None,  # the default depends on --optimizer (0 for sgd)
        seed_default=0.0,
    )
    sam_m: int | None = _setting(
        None,
        "m-sharpness: a separate perturbation per chunk of M samples (default: the batch; "
        "under torchrun each process's share of the batch)",
        OPTIMISATION,
        metavar="M",
        domain=domains.BATCH,
    )
    sam_adaptive: bool = _optimizer_option("sam", "adaptive", OPTIMISATION)
    esam_beta: float = _optimizer_option("esam", "beta", OPTIMISATION, metavar="BETA")
    esam_gamma: float = _optimizer_option("esam", "gamma", OPTIMISATION, metavar="GAMMA")
    esam_criterion: str = _optimizer_option("esam", "sds_criterion", OPTIMISATION)
    gsam_alpha: float = _optimizer_option("gsam", "alpha", OPTIMISATION, metavar="ALPHA")
    gsam_rho_min: float = _optimizer_option("gsam", "rho_min", OPTIMISATION, metavar="RHO")
    wsam_gamma: float = _optimizer_option("wsam", "gamma", OPTIMISATION, metavar="GAMMA")
    wsam_decouple: bool = _optimizer_option("wsam", "decouple", OPTIMISATION)
    fsam_sigma: float = _optimizer_option("fsam", "sigma", OPTIMISATION, metavar="SIGMA")
    fsam_lambda: float = _optimizer_option("fsam", "lmbda", OPTIMISATION, metavar="LAMBDA")
    looksam_k: int = _optimizer_option("looksam", "k", OPTIMISATION, metavar="K")
    looksam_alpha: float = _optimizer_option("looksam", "alpha", OPTIMISATION, metavar="ALPHA")
    aesam_delta: float = _optimizer_option("aesam", "delta", OPTIMISATION, metavar="DELTA")
    aesam_lambda1: float = _optimizer_option("aesam", "lambda1", OPTIMISATION, metavar="C")
    aesam_lambda2: float = _optimizer_option("aesam", "lambda2", OPTIMISATION, metavar="C")
    rst_p: float = _optimizer_option("rst", "p", OPTIMISATION, metavar="P")
    rst_p_end: float | None = _optimizer_option("rst", "p_end", OPTIMISATION, metavar="P")
    rst_schedule: str = _optimizer_option("rst", "schedule", OPTIMISATION)
    late_sam_start_fraction: float = _optimizer_option(
        "late_sam", "start_fraction", OPTIMISATION, metavar="FRACTION"
    )
    amp: str = _setting(
        "auto",
        "mixed precision: auto = bf16 autocast where the device computes bf16 natively (CPUs "
        "with AMX or AVX512-BF16, CUDA GPUs with bf16), float32 elsewhere (the choice is printed "
        "and in config.json as amp_resolved); none = float32; fp16 with a gradient scaler",
        OPTIMISATION,
        choices=("auto", "none", "bf16", "fp16"),
        seed_default="none",
    )
    sync_perturbations: bool = _setting(
        False,
        "under torchrun: all-reduce the first-pass gradients so every process perturbs with "
        "the global batch's gradient (default: each process perturbs with its own share, "
        "m = per-process batch, as the SAM paper)",
        OPTIMISATION,
    )
    sync_bn: bool = _setting(
        False,
        "under torchrun: convert BatchNorm layers to torch.nn.SyncBatchNorm, so they "
        "normalise over the global batch (CUDA devices only; refused on the CPU; no effect "
        "in one process)",
        OPTIMISATION,
    )
    trajectory_lambda: float = _optimizer_option("saf", "lmbda", OPTIMISATION, flag_default=None)
    trajectory_tau: float = _optimizer_option("saf", "tau", OPTIMISATION, metavar="TAU")
    trajectory_start_epoch: int = _optimizer_option("saf", "start_epoch", OPTIMISATION, metavar="N")
    saf_epochs_back: int = _optimizer_option("saf", "epochs_back", OPTIMISATION, metavar="E")
    mesa_ema_decay: float = _optimizer_option("mesa", "decay", OPTIMISATION, metavar="DECAY")
    run_seed: int = _setting(
        0,
        "seed of the initialisation, data order, augmentation, noise",
        OPTIMISATION,
        seed="--run_seed",
        metavar="SEED",
        domain=domains.SEED,
    )
    # Data
    use_test_set: bool = _setting(
        True,
        "evaluate on the test set; false: on a 10% holdout of the training set",
        DATA,
        seed="--use_test_set",
    )
    holdout_fraction: float = _setting(
        0.1, "fraction of the training set held out", DATA, is_flag=False
    )
    image_level_augmentations: str = _setting(
        "none",
        "basic: flip + reflect-pad 4 + crop; autoaugment: AutoAugment then basic "
        "(RandAugment(2, 9) + inception crop for imagenet/image_folder); aa-only: SVHN",
        DATA,
        seed="--image_level_augmentations",
        aliases=("--augment",),
        choices=IMAGE_LEVEL,
        seed_default="basic",
    )
    batch_level_augmentations: str = _setting(
        "none",
        "cutout after normalising",
        DATA,
        seed="--batch_level_augmentations",
        choices=BATCH_LEVEL,
    )
    cutout_length: int = _setting(
        16,
        "side of the cutout square",
        DATA,
        seed="--cutout_length",
        metavar="PX",
        domain=domains.PIXELS,
    )
    image_size: int | None = _setting(
        None,
        "crop size for imagenet / image_folder (default: 224)",
        DATA,
        metavar="PX",
        domain=domains.PIXELS,
    )
    label_noise: float = _setting(
        0.0,
        "flip this fraction of the training labels to another class (seeded, recorded in "
        "label_noise.json; the test set stays clean)",
        DATA,
        metavar="FRACTION",
        domain=domains.FRACTION,
    )
    bootstrap_from: str | None = _setting(
        None,
        "relabel the training set with the predictions of that finished run's model, then "
        "train from scratch",
        DATA,
        metavar="RUN_DIR",
    )
    train_subset: int | None = _setting(
        None,
        "train on the first N training images only",
        TRAINED,
        metavar="N",
        domain=domains.COUNT,
    )
    data_dir: str | None = _setting(
        None,
        "where the data set is (searched without it: $SAMKIT_DATA, "
        "~/.cache/samkit/<dataset>, and for Fashion-MNIST /usr/share/datasets/fashion-mnist)",
        DATA,
        metavar="DIR",
        affects_training=False,
    )
    workers: int = _setting(
        0,
        "data-loading worker processes (only for per-image augmentation and folders)",
        DATA,
        metavar="N",
        domain=domains.WORKERS,
        affects_training=False,
    )
    # Fine-tuning
    from_pretrained_checkpoint: bool = _setting(
        False,
        "start from the weights in --pretrained-checkpoint (default: true when that is given)",
        FINE_TUNING,
        seed="--from_pretrained_checkpoint",
        flag_default=None,
    )
    pretrained_checkpoint: str | None = _setting(
        None,
        "a LOCAL state_dict file (a samkit or timm checkpoint, or .safetensors), read without "
        "running code in it; a head with another class count is replaced by a new one",
        FINE_TUNING,
        seed="--efficientnet_checkpoint_path",
        aliases=("--efficientnet-checkpoint-path",),
        metavar="FILE",
    )
    freeze_bn_stats: bool = _setting(
        False, "keep the BatchNorm running statistics fixed", FINE_TUNING
    )
    # Evaluation
    evaluate_every: int = _setting(
        1,
        "evaluate every N epochs (and after the last)",
        EVALUATION,
        seed="--evaluate_every",
        metavar="EPOCHS",
        domain=domains.EPOCHS,
        affects_training=False,
    )
    compute_top_5_error_rate: bool = _setting(
        False,
        "also report the top-5 error rate",
        EVALUATION,
        seed="--compute_top_5_error_rate",
        affects_training=False,
    )
    eval_batch_size: int | None = _setting(
        None,
        "evaluation batch size (default: 1000, or --batch-size for image folders)",
        EVALUATION,
        metavar="N",
        domain=domains.BATCH,
        affects_training=False,
    )
    # Outputs, checkpoints, machine
    output_dir: str = _setting(
        "runs",
        "runs go to DIR/lr_{lr}/wd_{wd}/rho_{rho}/seed_{seed}/",
        MACHINE,
        seed="--output_dir",
        metavar="DIR",
        affects_training=False,
    )
    run_dir: str | None = _setting(
        None,
        "write the run exactly here instead of the nested layout under --output-dir",
        MACHINE,
        metavar="DIR",
        affects_training=False,
    )
    save_progress_seconds: float = _setting(
        3600.0,
        "also checkpoint every S seconds within an epoch (checkpoints are always written at "
        "each epoch end and on Ctrl-C / SIGTERM; 2 are kept)",
        MACHINE,
        seed="--save_progress_seconds",
        metavar="S",
        domain=domains.SECONDS,
        affects_training=False,
    )
    resume: bool = _setting(
        True,
        "continue from the run directory's latest good checkpoint; --no-resume discards "
        "its checkpoints and starts over",
        MACHINE,
        affects_training=False,
    )
    max_steps: int | None = _setting(
        None,
        "stop after N optimizer steps in total, evaluate and write the summary; the "
        "learning-rate schedule still spans --num-epochs (for smoke tests)",
        TRAINED,
        metavar="N",
        domain=domains.COUNT,
        affects_training=False,
    )
    device: str = _setting(
        "cpu",
        "torch device: cpu, cuda, cuda:1",
        MACHINE,
        metavar="DEVICE",
        affects_training=False,
    )
    threads: int | None = _setting(
        None,
        "CPU threads for torch (default: torch's choice, one per core); on a machine shared "
        "with other busy processes --threads 1 avoids a steep slowdown",
        MACHINE,
        metavar="N",
        domain=domains.THREADS,
        affects_training=False,
    )
    tensorboard: bool = _setting(True, "write TensorBoard scalars", MACHINE, affects_training=False)
    progress: bool | None = _setting(
        None,
        "show a progress bar (default: only on a terminal)",
        MACHINE,
        affects_training=False,
    )
    dist_timeout: float = _setting(
        1800.0,
        "under torchrun: seconds a collective operation waits for the other processes "
        "before the job fails",
        MACHINE,
        metavar="S",
        domain=domains.POSITIVE_SECONDS,
        affects_training=False,
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def sharpness_aware(self) -> bool:
        """True when the run takes sharpness-aware steps (rho > 0 with such an optimizer)."""
        return get_optimizer_info(self.optimizer).sharpness_aware and self.sam_rho > 0

    @property
    def effective_optimizer(self) -> str:
        """What runs: ``sgd`` for a sharpness-aware method at rho 0, else ``optimizer``."""
        no_rho = get_optimizer_info(self.optimizer).sharpness_aware and not self.sam_rho > 0
        return "sgd" if no_rho else self.optimizer

    @property
    def effective_rho(self) -> float:
        return self.sam_rho if self.sharpness_aware else 0.0


@dataclasses.dataclass(frozen=True)
class SettingField:
    """A :class:`TrainConfig` field with its :class:`Setting` and resolved type."""

    name: str
    default: Any
    kind: type  # bool, int, float or str (``X | None`` resolved to X)
    optional: bool  # None is a valid value
    setting: Setting

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flag_default(self) -> Any:
        return self.default if self.setting.flag_default is _SAME else self.setting.flag_default


def settings() -> list[SettingField]:
    """Every field of :class:`TrainConfig`, in order, with its :class:`Setting`."""
    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        members = typing.get_args(hint)  # (int, NoneType) for `int | None`; () for `int`
        optional = type(None) in members
        kind = next(t for t in members if t is not type(None)) if members else hint
        out.append(SettingField(f.name, f.default, kind, optional, f.metadata["setting"]))
    return out


#: The seed system's defaults where ours differ (field -> seed default), and the settings that may
#: change when a run is resumed (they do not change what is trained).
SEED_DEFAULTS: dict[str, Any] = {
    s.name: s.setting.seed_default for s in settings() if s.setting.seed_default is not _SAME
}
RESUME_IGNORED = frozenset(s.name for s in settings() if not s.setting.affects_training)


def settings_differences(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """How ``cfg`` differs from the settings ``saved`` with a run (its config.json, or the copy in
    a checkpoint), in the settings that change what is trained: ``--sam-rho 0.05 -> 0.5``. A key
    missing from ``saved`` (a run from before that setting existed) had its default."""
    defaults = TrainConfig().to_dict()
    return [
        f"--{key.replace('_', '-')} {saved.get(key, defaults[key])!r} -> {value!r}"
        for key, value in cfg.to_dict().items()
        if key not in RESUME_IGNORED and saved.get(key, defaults[key]) != value
    ]
