"""Fine-tuning helpers: load a local pretrained checkpoint into a model with a new head, and
freeze BatchNorm statistics.

``load_pretrained(model, path)`` reads a LOCAL file only (``torch.load(..., weights_only=True)``:
no code is executed and nothing is downloaded), accepting a bare ``state_dict`` or a dict with a
``"model"`` entry (as written by samkit's checkpoints), and drops the classification head's
tensors when their shapes differ from the model's (a new class count: the model keeps its
freshly initialised head). The head is the model's last ``nn.Linear`` (or the module named by
``head=``); every other mismatch is an error unless ``strict_backbone=False``.

``freeze_batchnorm_statistics(model)`` keeps every BatchNorm layer in evaluation mode (it
normalises with, and never updates, its running statistics) even after ``model.train()``.
"""

from __future__ import annotations

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
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle/EOF/key errors: an unreadable file
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
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(
            f"pretrained checkpoint {str(path)!r} holds neither a state_dict nor a dict with a "
            f"'model' state_dict (found {type(obj).__name__})"
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


def load_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    strict_backbone: bool = True,
    head: str | None = None,
) -> LoadReport:
    """Load the local checkpoint ``path`` into ``model`` (in place) for fine-tuning.

    Head tensors (those of module ``head``, by default :func:`find_head`) whose shapes differ
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
    head = find_head(model) if head is None else head
    if not head:
        raise ValueError("head must name a submodule of the model")
    head_prefix = head + "."
    own = model.state_dict()

    def is_head(key: str) -> bool:
        return key.startswith(head_prefix)

    report = LoadReport(path=path)
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
            f"(head {head!r}): {detail}"
        )
    model.load_state_dict(to_load, strict=False)
    report.loaded = list(to_load)
    if report.dropped:
        log.info("%s: new head, dropped %s", path, ", ".join(report.dropped))
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
