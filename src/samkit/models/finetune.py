"""Fine-tuning helpers: load a local pretrained checkpoint into a model with a new head, and
freeze BatchNorm statistics.

``load_pretrained(model, path)`` reads a LOCAL file only (``torch.load(..., weights_only=True)``,
or safetensors for ``*.safetensors``: no code is executed and nothing is downloaded), accepting a
bare ``state_dict`` or a dict with a ``"model"`` entry (as written by samkit's checkpoints) or a
``"state_dict"`` entry (timm's training checkpoints, whose ``argparse.Namespace`` of arguments is
allowed, as timm allows it), and drops the classification head's tensors when their shapes differ
from the model's (a new class count: the model keeps its freshly initialised head). The head is
the model's last ``nn.Linear`` (timm models: the classifier(s) their ``pretrained_cfg`` names; or
the module named by ``head=``); every other mismatch is an error unless ``strict_backbone=False``.
For timm models a stem convolution (``pretrained_cfg["first_conv"]``) saved for another number of
input channels is adapted as timm adapts it (summed over RGB for one channel).

``freeze_batchnorm_statistics(model)`` keeps every BatchNorm layer in evaluation mode (it
normalises with, and never updates, its running statistics) even after ``model.train()``.
"""

from __future__ import annotations

import argparse
import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "LoadReport",
    "find_head",
    "freeze_batchnorm_statistics",
    "is_batchnorm_frozen",
    "load_pretrained",
    "unfreeze_batchnorm_statistics",
]

log = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did. ``dropped`` lists the head tensors not loaded because
    their shapes differ; ``missing``/``unexpected``/``mismatched`` list other keys that were
    not loaded (only possible with ``strict_backbone=False``)."""

    path: Path
    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # stem convolutions with other in-channels

    @property
    def new_head(self) -> bool:
        return bool(self.dropped)


def find_head(model: nn.Module) -> str:
    """Name of the classification head: the last ``nn.Linear`` registered in ``model``."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    if name is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer; pass head= to name its classifier"
        )
    return name


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"pretrained checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {str(path)!r} is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # safetensors holds tensors only

            obj = load_file(path, device="cpu")
        else:
            # timm's training checkpoints keep their arguments as an argparse.Namespace: a plain
            # attribute holder, rebuilt without running code (timm's own loader allows it too)
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as exc:
        raise ValueError(
            f"pretrained checkpoint {str(path)!r}: reading .safetensors files needs the "
            f"safetensors package ({exc})"
        ) from exc
    except Exception as exc:  # zip/pickle/EOF/key/header errors: an unreadable file
        reason = _short_reason(exc)
        if isinstance(exc, pickle.UnpicklingError) and "unsupported global" in reason.lower():
            raise ValueError(
                f"pretrained checkpoint {str(path)!r} holds objects that weights_only loading "
                f"refuses ({reason}); save a plain state_dict (or {{'model': state_dict}})"
            ) from exc
        raise ValueError(
            f"cannot read pretrained checkpoint {str(path)!r}: file is corrupt or truncated "
            f"({reason})"
        ) from exc
    for key in ("model", "state_dict"):  # samkit's checkpoints, timm's training checkpoints
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(
            f"pretrained checkpoint {str(path)!r} holds neither a state_dict nor a dict with a "
            f"'model' or 'state_dict' state_dict (found {type(obj).__name__})"
        )
    state = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _short_reason(exc: BaseException) -> str:
    """The informative part of a loading error (torch's weights_only messages are long)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
        text = text.split(" was not an allowed global", 1)[0]
    text = " ".join(text.split()) or "no details"
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}"


def _few(keys: list[str], n: int = 5) -> str:
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _timm_cfg_modules(model: nn.Module, key: str) -> tuple[str, ...]:
    """The modules a timm model's ``pretrained_cfg[key]`` names (``"classifier"``: one, or two for
    distilled models; ``"first_conv"``), if all exist in ``model``; else ()."""
    cfg = getattr(model, "pretrained_cfg", None)
    names = cfg.get(key) if isinstance(cfg, Mapping) else None
    names = (names,) if isinstance(names, str) else tuple(names or ())
    modules = dict(model.named_modules())
    ok = names and all(isinstance(n, str) and n in modules for n in names)
    return names if ok else ()


def _adapt_input_convs(
    model: nn.Module, own: Mapping[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> list[str]:
    """Adapt, in ``state``, a timm model's stem convolution saved for another number of input
    channels (``timm.models.adapt_input_conv``: summed over RGB for 1 channel, RGB repeated and
    scaled for more); returns the keys adapted."""
    adapted = []
    for conv in _timm_cfg_modules(model, "first_conv"):
        key = conv + ".weight"
        mine, theirs = own.get(key), state.get(key)
        if mine is None or theirs is None or mine.ndim != 4 or theirs.ndim != 4:
            continue
        if mine.shape[1] == theirs.shape[1] or mine.shape[:1] + mine.shape[2:] != (
            theirs.shape[:1] + theirs.shape[2:]
        ):
            continue
        from timm.models import adapt_input_conv  # a timm model: timm is installed

        try:
            state[key] = adapt_input_conv(mine.shape[1], theirs)
        except (AssertionError, NotImplementedError):  # not RGB-like: stays a mismatch
            continue
        adapted.append(key)
    return adapted


def load_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    strict_backbone: bool = True,
    head: str | None = None,
) -> LoadReport:
    """Load the local checkpoint ``path`` into ``model`` (in place) for fine-tuning.

    Head tensors (those of module ``head``, by default :func:`find_head`, or for a timm model the
    classifier(s) its ``pretrained_cfg`` names) whose shapes differ
    from the model's are dropped, keeping the model's fresh head; they are listed in the
    returned report's ``dropped`` (and logged). With ``strict_backbone`` (default) any other
    difference (a missing or unexpected key, a shape mismatch outside the head) raises a
    ``ValueError`` naming the file and a few keys; otherwise those keys are skipped and
    reported. A missing file raises ``FileNotFoundError``, an unreadable one ``ValueError``
    ("corrupt or truncated"); both name the file. BatchNorm ``num_batches_tracked`` counters
    absent from the checkpoint are not an error.
    """
    path = Path(path)
    state = _read_checkpoint(path)
    if head is None:
        heads = _timm_cfg_modules(model, "classifier") or (find_head(model),)
    elif not head:
        raise ValueError("head must name a submodule of the model")
    else:
        heads = (head,)
    head_prefixes = tuple(h + "." for h in heads)
    own = model.state_dict()

    def is_head(key: str) -> bool:
        return key.startswith(head_prefixes)

    report = LoadReport(path=path)
    report.adapted = _adapt_input_convs(model, own, state)
    to_load: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            (report.dropped if is_head(key) else report.mismatched).append(key)
        else:
            to_load[key] = value
    report.missing = [
        k
        for k in own
        if k not in state and not is_head(k) and not k.endswith("num_batches_tracked")
    ]
    problems = [
        (what, keys)
        for what, keys in (
            ("shape mismatches outside the head", report.mismatched),
            ("keys missing from the checkpoint", report.missing),
            ("keys the model does not have", report.unexpected),
        )
        if keys
    ]
    if problems and strict_backbone:
        detail = "; ".join(f"{what}: {_few(keys)}" for what, keys in problems)
        raise ValueError(
            f"pretrained checkpoint {str(path)!r} does not match {type(model).__name__} "
            f"(head {', '.join(map(repr, heads))}): {detail}"
        )
    model.load_state_dict(to_load, strict=False)
    report.loaded = list(to_load)
    if report.dropped:
        log.info("%s: new head, dropped %s", path, ", ".join(report.dropped))
    if report.adapted:
        log.info("%s: input channels adapted in %s", path, ", ".join(report.adapted))
    for what, keys in problems:
        log.warning("%s: not loaded, %s: %s", path, what, _few(keys))
    return report


# -- BatchNorm freezing -----------------------------------------------------------------------


def _keep_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: whatever ``train()`` did, normalise with the running statistics."""
    module.training = False


def is_batchnorm_frozen(module: nn.Module) -> bool:
    return any(h is _keep_eval for h in module._forward_pre_hooks.values())


def freeze_batchnorm_statistics(model: nn.Module) -> int:
    """Keep every BatchNorm layer of ``model`` in evaluation mode; return how many were frozen.

    Each BatchNorm module is switched to ``eval()`` now and gets a forward pre-hook that sets
    ``training = False`` before every forward, so neither ``model.train()`` (e.g. inside a
    training loop) nor the SAM step helper can make it use batch statistics or update its
    running mean/variance. Its affine weight and bias still train. A hook (rather than patching
    ``train``) survives ``copy.deepcopy`` and pickling and covers code that sets ``training``
    directly. Note that ``bn.training`` may read True between ``model.train()`` and the next
    forward; the forward is what counts. Idempotent; undo with
    :func:`unfreeze_batchnorm_statistics`.
    """
    count = 0
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
            if not is_batchnorm_frozen(m):
                m.register_forward_pre_hook(_keep_eval)
            count += 1
    return count


def unfreeze_batchnorm_statistics(model: nn.Module) -> int:
    """Remove :func:`freeze_batchnorm_statistics`' hooks (modes follow ``model.training``)."""
    count = 0
    for m in model.modules():
        if isinstance(m, _BatchNorm) and is_batchnorm_frozen(m):
            for hook_id in [i for i, h in m._forward_pre_hooks.items() if h is _keep_eval]:
                del m._forward_pre_hooks[hook_id]
            m.train(model.training)
            count += 1
    return count
