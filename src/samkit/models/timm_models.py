"""Any timm model as ``timm:<name>`` (``timm:resnet18``, ``timm:convnext_atto``, ``timm:test_vit``).

One model family of the registry: ``create_model("timm:NAME", num_classes=..., in_channels=...)``
calls ``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=...)`` (other
keywords reach timm too, e.g. ``drop_rate``). timm is imported when such a name is first checked
or built, never when samkit is imported; without timm the name is refused saying so. NAME is one
of ``timm.list_models()``, optionally with a pretrained tag (``resnet18.a1_in1k``: the tag only
picks timm's configuration, nothing is loaded); an unknown name is refused with its closest
matches.

Nothing is downloaded: ``pretrained`` is always False, hub names (``hf-hub:...``) and the keywords
that load weights (``pretrained=True``, ``pretrained_cfg_overlay``, ``checkpoint_path``) are
refused. To start from local weights use :func:`samkit.models.finetune.load_pretrained`
(``samkit train --pretrained-checkpoint FILE``), which reads timm's checkpoint formats too.

timm models take any number of input channels (``in_chans``: Fashion-MNIST's 1 included), but
some need a minimum or a fixed image size (ViTs built for their ``img_size``, ConvNeXt's 4x4
stem on 28 px images, MaxViT's windows): :func:`input_problem` finds out with a forward pass on
PyTorch's ``meta`` device (no memory, no arithmetic), so ``samkit train`` refuses such a model
before any work.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from typing import Any

import torch
import torch.nn as nn

from samkit.models.registry import register_model_family

__all__ = ["PREFIX", "build_timm_model", "check_timm_name", "input_problem"]

PREFIX = "timm:"

#: Keywords of timm.create_model that would load weights (from the hub or a file).
_LOADING_KEYWORDS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")


def _import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ValueError(
            "timm:... models need the timm package, which is not installed "
            "(pip install timm, or pip install 'samkit[integrations]')"
        ) from None
    return timm


def _close_matches(timm: Any, arch: str) -> str:
    names = timm.list_models()
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
    close += [n for n in fnmatch.filter(names, f"*{arch}*") if n not in close][: 5 - len(close)]
    listed = f"close matches: {', '.join(PREFIX + n for n in close)}" if close else "no close match"
    return f"{listed} (timm {timm.__version__} has {len(names)}: timm.list_models())"


def check_timm_name(name: str) -> str:
    """The timm name of ``name`` (``"timm:resnet18"`` -> ``"resnet18"``); ``ValueError`` saying
    why it names no timm model (timm missing, unknown name with its closest matches, hub name,
    unknown pretrained tag)."""
    rest = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if not rest:
        raise ValueError("'timm:' needs a timm model name after it, e.g. timm:resnet18")
    if ":" in rest or "/" in rest:
        raise ValueError(
            f"{name!r}: only timm's own architectures (timm.list_models()) are built, never a "
            "model from the Hugging Face hub (samkit downloads nothing)"
        )
    timm = _import_timm()
    arch, _, tag = rest.partition(".")
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {rest!r}; {_close_matches(timm, arch)}")
    if tag:
        tagged = timm.list_pretrained(f"{arch}.*")
        if rest not in tagged:
            tags = ", ".join(n.partition(".")[2] for n in tagged[:8]) or "none"
            raise ValueError(
                f"timm model {arch!r} has no pretrained tag {tag!r} (its tags: {tags})"
            )
    return rest


def build_timm_model(
    name: str, num_classes: int = 1000, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=..., **kwargs)``."""
    rest = check_timm_name(name)
    loading = [k for k in _LOADING_KEYWORDS if kwargs.get(k)]
    if loading:
        raise ValueError(
            f"{name}: {', '.join(loading)} would load weights; samkit builds timm models with "
            "pretrained=False and never downloads: load a local file with "
            "samkit.models.finetune.load_pretrained(model, path) (--pretrained-checkpoint)"
        )
    kwargs = {k: v for k, v in kwargs.items() if k not in _LOADING_KEYWORDS}
    timm = _import_timm()
    return timm.create_model(
        rest, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
    )


@functools.lru_cache(maxsize=64)
def input_problem(name: str, num_classes: int, in_channels: int, image_size: int) -> str | None:
    """Why model ``name`` cannot take ``in_channels x image_size x image_size`` images (the error
    its forward raises, on one line), or None: it can, or the ``meta`` device cannot tell (an
    operation without a meta kernel).

    Builds the model and runs a training-mode forward of a batch of 2 on the ``meta`` device."""
    try:
        with torch.device("meta"):
            model = build_timm_model(name, num_classes, in_channels)
    except Exception:  # name problems are reported by the name check; others: cannot tell
        return None
    try:
        with torch.device("meta"), torch.no_grad():
            model.train()(torch.empty(2, in_channels, image_size, image_size))
    except (AssertionError, RuntimeError, ValueError) as exc:
        text = " ".join(str(exc).split())
        if isinstance(exc, NotImplementedError) or "meta" in text.lower():
            return None
        text = text if len(text) <= 160 else text[:157] + "..."
        return f"{type(exc).__name__}: {text}"
    except Exception:
        return None
    return None


register_model_family(r"timm:.*", build_timm_model, display="timm:{name}", check=check_timm_name)
