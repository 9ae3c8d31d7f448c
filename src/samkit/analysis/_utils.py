"""Helpers shared by the analysis modules: batches, evaluation mode, flat parameter vectors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

#: A batch is ``(inputs, targets)``; ``loss_fn(model(inputs), targets)`` returns the MEAN loss.
Batch = Sequence[Any]
#: ``loss_fn(outputs, targets)`` -> scalar mean loss of the batch, e.g. ``nn.CrossEntropyLoss()``.
LossFn = Callable[[Any, Any], Tensor]


def as_batch_list(batches: Iterable[Batch]) -> list[tuple[Any, Any]]:
    """Materialise ``batches`` (a list, a DataLoader, ...) into a fixed list of ``(x, y)`` pairs."""
    out = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, Sequence) or len(batch) < 2:
            raise TypeError(f"batch {i} must be an (inputs, targets) pair, got {type(batch)!r}")
        out.append((batch[0], batch[1]))
    if not out:
        raise ValueError("no batches given: need at least one (inputs, targets) pair")
    return out


def batch_size(batch: tuple[Any, Any]) -> int:
    """Number of examples in a batch: the leading dimension of its targets (or inputs)."""
    for item in (batch[1], batch[0]):
        if isinstance(item, Tensor) and item.dim() > 0:
            return int(item.shape[0])
    raise TypeError("cannot infer the batch size: neither the targets nor the inputs are tensors")


def batch_weights(batches: Sequence[tuple[Any, Any]]) -> list[float]:
    """``n_b / sum_b n_b``: weighting per-batch mean losses this way gives the subset mean loss."""
    sizes = [batch_size(b) for b in batches]
    total = sum(sizes)
    if total == 0:
        raise ValueError("the batches contain no examples")
    return [n / total for n in sizes]


def model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def to_device(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode (BatchNorm uses running stats, no dropout); restore the
    per-module ``training`` flags afterwards, even if they were mixed."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def trainable_parameters(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[offset : offset + n].view_as(t))
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the parameters have {offset}")
    return out


def mean_loss(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[tuple[Any, Any]], weights: list[float]
) -> Tensor:
    """``sum_b (n_b / N) loss_fn(model(x_b), y_b)`` without gradient, as a 0-dim tensor."""
    device = model_device(model)
    total: Tensor | None = None
    with torch.no_grad():
        for (x, y), w in zip(batches, weights):
            loss = loss_fn(model(to_device(x, device)), to_device(y, device)).detach() * w
            total = loss if total is None else total + loss
    assert total is not None
    return total


def new_figure(figsize: tuple[float, float] = (6.0, 4.0)) -> Any:
    """A matplotlib Figure on an Agg canvas, without touching pyplot or the global backend."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plotting needs matplotlib: pip install matplotlib (the analysis numbers do not)"
        ) from exc
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path, dpi: int = 150) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
