"""From settings to a :class:`TrainConfig` that can run: each value in its domain, the settings
that only make sense together, and what the machine must have (model, device, files).

Every problem is a :class:`ConfigError` whose message starts with the flag at fault. The command
line parses text into values and calls :func:`config_from_values`; ``samkit sweep`` calls it with
a spec's values, so a spec is checked exactly as ``samkit train`` would check its command line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from samkit.data.datasets import DATASET_SPECS
from samkit.data.transforms import train_transform
from samkit.models import (
    MAX_PARAMETERS,
    count_parameters,
    list_model_families,
    list_models,
    model_name_problem,
    timm_models,
)
from samkit.optim import get_optimizer_info, list_optimizers
from samkit.rundir import CONFIG_FILE
from samkit.train.config import BASE_LEARNING_RATES, SettingField, TrainConfig, settings
from samkit.train.errors import ConfigError
from samkit.train.trajectory import METHODS as TRAJECTORY_METHODS

__all__ = ["check_value", "config_from_values", "device_problem"]


def device_problem(name: str) -> str | None:
    """An error message if ``name`` is not a usable torch device, else None."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"--device: {name!r} is not a torch device (try cpu or cuda)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: CUDA is not available on this machine"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {name}: MPS is not available on this machine"
    if device.type not in ("cpu", "cuda", "mps"):
        return f"--device {name}: unsupported device type {device.type!r}"
    return None


def check_value(field: SettingField, value: Any) -> Any:
    """``value`` if it is of the setting's type and in its domain or choices (ints are accepted
    for floats), else :class:`ConfigError` in the command line's words."""
    flag, setting = field.flag, field.setting
    if value is None and (field.optional or field.flag_default is None):
        return value
    kind = field.kind
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**1023 else math.inf  # past float: out of domain
    if (
        kind is bool
        and not isinstance(value, bool)
        or (kind is not bool and (isinstance(value, bool) or not isinstance(value, kind)))
    ):
        raise ConfigError(f"{flag}: {value!r} is not {_kind_name(kind)}")
    if setting.choices is not None and value not in setting.choices:
        choices = ", ".join(repr(c) for c in setting.choices)
        raise ConfigError(f"{flag}: invalid choice: {value!r} (choose from {choices})")
    if setting.domain is not None and kind in (int, float) and not setting.domain.contains(value):
        raise ConfigError(f"{flag}: {value!r} is not {setting.domain.describe(kind is int)}")
    return value


def _check_model(name: str, dataset: str, image_size: int | None = None) -> None:
    """The model exists and is not absurdly large (counted on the meta device, before anything
    is allocated: a typo like wrn_1000_1000 would otherwise allocate for minutes, then fail); a
    timm model also takes the data set's images (tried on the meta device)."""
    problem = model_name_problem(name)
    if problem is not None:
        known = ""
        if problem.startswith("unknown model"):
            families = ", ".join(list_model_families())
            known = f"; known: {', '.join(list_models())} (and any {families})"
        raise ConfigError(f"--model-name: {problem}{known}")
    spec = DATASET_SPECS[dataset]
    count = count_parameters(name, spec.num_classes or 1000, spec.in_channels)
    if count is not None and count > MAX_PARAMETERS:
        raise ConfigError(
            f"--model-name {name}: {count:,} parameters, more than samkit builds "
            f"({MAX_PARAMETERS:,})"
        )
    if name.startswith(timm_models.PREFIX):
        size = image_size or spec.image_size
        problem = timm_models.input_problem(name, spec.num_classes or 1000, spec.in_channels, size)
        if problem is not None:
            raise ConfigError(
                f"--model-name {name}: cannot take {dataset}'s {spec.in_channels}x{size}x{size} "
                f"images ({problem}); a model with a fixed or minimum input size needs larger "
                "images (--dataset image_folder or imagenet with --image-size)"
            )


def _kind_name(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]


def _check_trajectory(method: str, v: dict[str, Any]) -> None:
    """SAF / MESA: a run long enough for the trajectory loss to start."""
    first = v["trajectory_start_epoch"]
    needs = ""
    if method == "saf" and v["saf_epochs_back"] > first:
        first = v["saf_epochs_back"]
        needs = f" (it needs the logits of --saf-epochs-back {first} epochs before)"
    if first >= v["num_epochs"]:
        raise ConfigError(
            f"--trajectory-start-epoch {v['trajectory_start_epoch']}: --optimizer {method} adds "
            f"its loss from epoch {first + 1} on{needs}, but --num-epochs is {v['num_epochs']}: "
            "the run would be the base optimizer alone"
        )


#: The flags of one base optimizer; given with the other they would have no effect.
BASE_OPTIMIZER_FLAGS = {
    "sgd": ("momentum", "nesterov"),
    "adamw": ("adamw_beta1", "adamw_beta2", "adamw_eps"),
}


def _refuse_flags_without_effect(values: dict[str, Any], base: str, info: Any) -> None:
    """ConfigError for a flag given (``values``: the settings given, not defaulted) that the
    chosen base optimizer or method would ignore, e.g. ``--momentum`` over AdamW."""
    for owner, names in BASE_OPTIMIZER_FLAGS.items():
        given = [n for n in names if n in values and owner != base]
        if given:
            raise ConfigError(
                f"--{given[0].replace('_', '-')}: only for --base-optimizer {owner}, and this "
                f"run's base optimizer is {base}"
            )
    # --run-seed is every run's; --sam-rho without effect has its own message below
    own = {o.flag for o in info.options} | {"run_seed", "sam_rho"}
    for name in list_optimizers():
        other = get_optimizer_info(name)
        given = [o.flag for o in other.options if o.flag in values and o.flag not in own]
        if given:
            raise ConfigError(
                f"--{given[0].replace('_', '-')}: an option of --optimizer {other.name}, which "
                f"this run does not use (--optimizer {info.name})"
            )


def config_from_values(values: dict[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` of ``values`` (field name -> value; missing ones take the
    command line's defaults), after every check a run needs before it starts."""
    fields = {f.name: f for f in settings() if f.setting.is_flag}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is not a samkit train setting")
    v = {name: field.flag_default for name, field in fields.items()}
    v.update({name: check_value(fields[name], value) for name, value in values.items()})

    _check_model(v["model_name"], v["dataset"], v["image_size"])
    problem = device_problem(v["device"])
    if problem:
        raise ConfigError(problem)
    try:
        train_transform(
            v["dataset"],
            v["image_level_augmentations"],
            v["batch_level_augmentations"],
            v["cutout_length"],
            image_size=v["image_size"],
        )
    except ValueError as exc:
        raise ConfigError(f"--image-level-augmentations: {exc}") from None
    if v["image_size"] is not None and v["dataset"] not in ("imagenet", "image_folder"):
        raise ConfigError(f"--image-size: only for imagenet / image_folder, not {v['dataset']}")

    info = get_optimizer_info(v["optimizer"])
    _refuse_flags_without_effect(values, v["base_optimizer"], info)
    rho = v["sam_rho"]
    if not info.sharpness_aware:
        if rho:
            raise ConfigError(f"--sam-rho {rho:g}: has no effect with --optimizer {info.name}")
        rho = 0.0
    elif rho is None:
        rho = TrainConfig.sam_rho
    v["sam_rho"] = rho
    if v["learning_rate"] is None:
        v["learning_rate"] = BASE_LEARNING_RATES[v["base_optimizer"]]
    if v["trajectory_lambda"] is None:  # SAF's and MESA's own defaults
        lmbda = [o.default for o in info.options if o.flag == "trajectory_lambda"]
        v["trajectory_lambda"] = lmbda[0] if lmbda else TrainConfig.trajectory_lambda
    if info.name in TRAJECTORY_METHODS:
        _check_trajectory(info.name, v)
    if v["warmup_epochs"] >= v["num_epochs"]:
        raise ConfigError(
            f"--warmup-epochs {v['warmup_epochs']:g}: must be shorter than --num-epochs "
            f"{v['num_epochs']} (the cosine decay follows the warm-up)"
        )
    if v["sync_perturbations"] and not info.supports_sync_perturbations:
        raise ConfigError(
            f"--sync-perturbations: not supported with --optimizer {info.name} (its weight masks "
            "leave parameters without first-pass gradients to synchronise); use --optimizer sam"
        )
    if v["sam_m"] is not None and (not info.sharpness_aware or rho == 0):
        raise ConfigError("--sam-m: m-sharpness needs --optimizer sam or esam with --sam-rho > 0")
    if v["sam_m"] is not None:
        world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
        share = v["batch_size"] // world
        where = f"each process's share of the batch ({share})" if world > 1 else "--batch-size"
        if v["sam_m"] > share or share % v["sam_m"]:
            raise ConfigError(
                f"--sam-m {v['sam_m']}: must divide {where} {'' if world > 1 else share} into "
                "equal chunks".replace("  ", " ")
            )
    if v["sam_m"] is not None and getattr(info.cls, "one_first_pass_per_step", False):
        raise ConfigError(
            f"--sam-m: m-sharpness is not supported with --optimizer {info.name} (a step takes a "
            "single first pass: it keeps state from it, or decides from it whether to ascend)"
        )
    if (
        getattr(info.cls, "stores_clean_gradient", False)
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
        and not v["sync_perturbations"]
    ):
        raise ConfigError(
            f"--optimizer {info.name}: under torchrun it needs --sync-perturbations (it combines "
            "the first-pass gradient with the all-reduced second-pass one)"
        )
    if info.name == "gsam" and v["gsam_rho_min"] > rho:
        raise ConfigError(f"--gsam-rho-min {v['gsam_rho_min']:g}: larger than --sam-rho {rho:g}")
    if info.name == "rst" and v["rst_schedule"] != "constant" and v["rst_p_end"] is None:
        raise ConfigError(
            f"--rst-schedule {v['rst_schedule']}: moves p_t from --rst-p to --rst-p-end over the "
            "run; give --rst-p-end"
        )
    if info.name == "rst" and v["rst_schedule"] == "constant" and v["rst_p_end"] is not None:
        raise ConfigError(
            f"--rst-p-end {v['rst_p_end']:g}: has no effect with --rst-schedule constant (p_t is "
            "--rst-p); add --rst-schedule piecewise, linear or cosine"
        )
    v["gradient_clipping"] = v["gradient_clipping"] or None

    if v["data_dir"] is not None and not Path(v["data_dir"]).expanduser().is_dir():
        raise ConfigError(f"--data-dir {v['data_dir']}: no such directory")
    if v["bootstrap_from"] is not None:
        source = Path(v["bootstrap_from"]).expanduser()
        if not source.is_dir():
            raise ConfigError(f"--bootstrap-from {v['bootstrap_from']}: no such run directory")
        if not (source / CONFIG_FILE).is_file():
            raise ConfigError(
                f"--bootstrap-from {v['bootstrap_from']}: not a samkit run directory (no "
                "config.json)"
            )
        if v["label_noise"] > 0:
            raise ConfigError("--label-noise: cannot be combined with --bootstrap-from")

    pretrained = v["from_pretrained_checkpoint"]
    if pretrained is None:
        pretrained = v["pretrained_checkpoint"] is not None
    if pretrained:
        if v["pretrained_checkpoint"] is None:
            raise ConfigError(
                "--from-pretrained-checkpoint: needs the checkpoint file, "
                "--pretrained-checkpoint FILE (the seed's --efficientnet_checkpoint_path)"
            )
        if not Path(v["pretrained_checkpoint"]).expanduser().is_file():
            raise ConfigError(f"--pretrained-checkpoint {v['pretrained_checkpoint']}: no such file")
    elif v["pretrained_checkpoint"] is not None:
        raise ConfigError(
            "--pretrained-checkpoint: given together with --from-pretrained-checkpoint false"
        )
    v["from_pretrained_checkpoint"] = pretrained
    v["pretrained_checkpoint"] = v["pretrained_checkpoint"] if pretrained else None
    return TrainConfig(**v)
