"""Loss landscapes: filter-normalised random directions (Li, Xu, Taylor, Studer & Goldstein,
"Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018), 1-D / 2-D surfaces and linear
interpolation between two solutions (Goodfellow, Vinyals & Saxe, ICLR 2015).

Filter normalisation (Li et al., Sec. 4): draw ``d ~ N(0, I)`` with the shape of the weights, then
for every layer ``i`` and every output filter ``j`` (row ``j`` of a linear weight, output channel
``j`` of a conv kernel)::

    d_{i,j} <- d_{i,j} / ||d_{i,j}|| * ||w_{i,j}||

so that a step along ``d`` is comparable across layers whatever their scale (which batch
normalisation makes arbitrary). Parameters with at most one dimension (biases, BatchNorm / LayerNorm
affine parameters) get ``d = 0`` by default, as in Li et al.; ``include_bias_bn=True`` keeps them,
each rescaled as a single filter to the norm of the parameter.

Surfaces are ``f(alpha) = L(w + alpha d)`` and ``f(alpha, beta) = L(w + alpha d1 + beta d2)``; the
interpolation is ``L((1 - t) w_a + t w_b)`` over the whole state dict (BatchNorm running
statistics interpolated too). Losses are means over fixed batches with the model in eval mode. The
model's weights (and buffers) are restored bit-exactly, in place, afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from samkit.analysis._utils import (
    Batch,
    LossFn,
    as_batch_list,
    batch_weights,
    eval_mode,
    mean_loss,
    new_figure,
    save_figure,
)
from samkit.analysis.progress import progress_bar

__all__ = [
    "evaluate_loss",
    "filter_normalize",
    "filter_normalized_direction",
    "interpolation_curve",
    "loss_surface_1d",
    "loss_surface_2d",
    "plot_loss_contour",
    "plot_loss_curve",
    "plot_loss_surface_3d",
]

#: A direction in weight space: parameter name (as in ``model.named_parameters()``) -> tensor.
Direction = dict[str, Tensor]


def filter_normalize(
    direction: Mapping[str, Tensor], model: nn.Module, *, include_bias_bn: bool = False
) -> Direction:
    """Rescale ``direction`` filter by filter to the norms of ``model``'s weights (Li et al. 2018).

    For a parameter with ``ndim >= 2`` each slice ``[j]`` along dim 0 (an output filter) gets
    ``d_j * ||w_j|| / ||d_j||`` (zero where ``d_j`` or ``w_j`` is zero). Parameters with
    ``ndim <= 1`` are zeroed, or with ``include_bias_bn`` rescaled as one filter. Returns a new
    dict; ``direction`` is not modified. Names missing from ``direction`` get zeros.
    """
    out: Direction = {}
    for name, w in model.named_parameters():
        d = direction.get(name)
        if d is None or (w.dim() <= 1 and not include_bias_bn):
            out[name] = torch.zeros_like(w)
            continue
        if d.shape != w.shape:
            raise ValueError(
                f"direction {name!r} has shape {tuple(d.shape)}, the weight {tuple(w.shape)}"
            )
        d64 = d.detach().to(device=w.device, dtype=torch.float64)
        w64 = w.detach().to(torch.float64)
        rows = 1 if w.dim() <= 1 else w.shape[0]
        d2, w2 = d64.reshape(rows, -1), w64.reshape(rows, -1)
        d_norm = torch.linalg.vector_norm(d2, dim=1, keepdim=True)
        w_norm = torch.linalg.vector_norm(w2, dim=1, keepdim=True)
        scale = torch.where(d_norm > 0, w_norm / d_norm.clamp_min(1e-300), torch.zeros_like(d_norm))
        out[name] = (d2 * scale).reshape(w.shape).to(dtype=w.dtype)
    return out


def filter_normalized_direction(
    model: nn.Module,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    include_bias_bn: bool = False,
) -> Direction:
    """A random Gaussian direction, filter-normalised to ``model``'s weights (Li et al. 2018).

    Drawn on the CPU from ``generator`` (default: seeded with ``seed``) in ``named_parameters()``
    order, so a seed gives the same direction on every device.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    raw = {
        name: torch.randn(w.shape, generator=gen, dtype=torch.float64)
        for name, w in model.named_parameters()
    }
    return filter_normalize(raw, model, include_bias_bn=include_bias_bn)


def evaluate_loss(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch]) -> float:
    """``L(w) = sum_b (n_b / N) loss_fn(model(x_b), y_b)`` in eval mode, without gradients."""
    batch_list = as_batch_list(batches)
    with eval_mode(model):
        return float(mean_loss(model, loss_fn, batch_list, batch_weights(batch_list)))


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Back up the whole state dict; copy it back in place (bit-exact) on exit."""
    live = model.state_dict(keep_vars=True)
    backup = {k: v.detach().clone() for k, v in live.items()}
    try:
        yield backup
    finally:
        with torch.no_grad():
            for k, v in live.items():
                v.copy_(backup[k])


def _check_direction(model: nn.Module, direction: Mapping[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = [k for k in direction if k not in params]
    if unknown:
        raise KeyError(f"direction names not among the model's parameters: {unknown[:5]}")
    for k, d in direction.items():
        if d.shape != params[k].shape:
            raise ValueError(
                f"direction {k!r} has shape {tuple(d.shape)}, the weight {tuple(params[k].shape)}"
            )


def loss_surface_1d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    direction: Mapping[str, Tensor],
    alphas: Sequence[float] | np.ndarray,
    *,
    progress: bool | None = None,
) -> np.ndarray:
    """``f[i] = L(w + alphas[i] * d)``, a float64 array of ``len(alphas)``."""
    zero = {k: torch.zeros_like(v) for k, v in direction.items()}
    return loss_surface_2d(
        model, loss_fn, batches, direction, zero, alphas, [0.0], progress=progress
    )[0]


def loss_surface_2d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    direction_x: Mapping[str, Tensor],
    direction_y: Mapping[str, Tensor],
    alphas: Sequence[float] | np.ndarray,
    betas: Sequence[float] | np.ndarray,
    *,
    progress: bool | None = None,
) -> np.ndarray:
    """``f[i, j] = L(w + alphas[j] * d_x + betas[i] * d_y)``: shape ``(len(betas), len(alphas))``,
    the layout ``matplotlib``'s ``contour(alphas, betas, f)`` expects. Each point sets the weights
    to ``w + alpha d_x + beta d_y`` from the saved ``w`` (so a zero coefficient leaves a weight
    bit-identical); cost ``len(alphas) * len(betas)`` forward passes over the batches."""
    _check_direction(model, direction_x)
    _check_direction(model, direction_y)
    batch_list = as_batch_list(batches)
    weights = batch_weights(batch_list)
    a = np.asarray(alphas, dtype=np.float64).reshape(-1)
    b = np.asarray(betas, dtype=np.float64).reshape(-1)
    out = np.empty((b.size, a.size), dtype=np.float64)
    params = dict(model.named_parameters())
    names = sorted(set(direction_x) | set(direction_y), key=list(params).index)
    dx = {k: direction_x[k].to(params[k]) if k in direction_x else None for k in names}
    dy = {k: direction_y[k].to(params[k]) if k in direction_y else None for k in names}
    grid = [(i, j) for i in range(b.size) for j in range(a.size)]
    with _restored(model) as clean, eval_mode(model), torch.no_grad():
        for i, j in progress_bar(grid, progress, desc="loss surface", unit="points"):
            for k in names:
                p = params[k].copy_(clean[k])
                if dx[k] is not None and a[j] != 0.0:
                    p.add_(dx[k], alpha=float(a[j]))
                if dy[k] is not None and b[i] != 0.0:
                    p.add_(dy[k], alpha=float(b[i]))
            out[i, j] = float(mean_loss(model, loss_fn, batch_list, weights))
    return out


def interpolation_curve(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    ts: Sequence[float] | np.ndarray,
    *,
    progress: bool | None = None,
) -> np.ndarray:
    """``f[i] = L(w(ts[i]))`` with ``w(t) = (1 - t) w_a + t w_b`` on every floating-point entry of
    the state dicts (weights AND buffers such as BatchNorm running statistics; integer buffers such
    as ``num_batches_tracked`` are taken from ``state_a``). ``t`` may leave ``[0, 1]``
    (extrapolation); there a BatchNorm running variance (an entry named ``*running_var``) can
    extrapolate below zero, which would make the loss NaN, so it is clamped at 0 (BatchNorm adds
    its ``eps``); inside ``[0, 1]`` the clamp never acts. ``t = 0`` and ``t = 1`` reproduce
    ``w_a`` and ``w_b`` bit-exactly. ``model`` supplies the architecture; its own state is
    restored afterwards. ``state_a`` / ``state_b`` may be the model's own ``state_dict()``
    (they are copied first)."""
    batch_list = as_batch_list(batches)
    weights = batch_weights(batch_list)
    live = model.state_dict(keep_vars=True)
    for name, sd in (("state_a", state_a), ("state_b", state_b)):
        missing = [k for k in live if k not in sd]
        if missing:
            raise KeyError(f"{name} lacks entries of the model's state dict: {missing[:5]}")
    ta = np.asarray(ts, dtype=np.float64).reshape(-1)
    out = np.empty(ta.size, dtype=np.float64)
    # Copies: a state dict of ``model`` itself shares storage with the tensors overwritten below.
    pairs = {
        k: (
            state_a[k].detach().to(v.device, v.dtype, copy=True),
            state_b[k].detach().to(v.device, v.dtype, copy=True),
        )
        for k, v in live.items()
    }
    with _restored(model), eval_mode(model), torch.no_grad():
        for i, t in enumerate(progress_bar(ta, progress, desc="interpolation", unit="points")):
            for k, v in live.items():
                wa, wb = pairs[k]
                if v.is_floating_point():  # exact at t = 0 and t = 1
                    v.copy_(torch.add(wa * (1.0 - float(t)), wb, alpha=float(t)))
                    if k.endswith("running_var"):
                        v.clamp_(min=0.0)
                else:
                    v.copy_(wa)
            out[i] = float(mean_loss(model, loss_fn, batch_list, weights))
    return out


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg canvas; pyplot and the global backend are left alone)
# --------------------------------------------------------------------------------------------


def plot_loss_curve(
    xs: Sequence[float] | np.ndarray,
    losses: np.ndarray | Sequence[float] | Mapping[str, np.ndarray | Sequence[float]],
    path: str | Path,
    *,
    xlabel: str = "alpha",
    ylabel: str = "loss",
    title: str | None = None,
    log_scale: bool = False,
) -> Path:
    """A 1-D curve (or several: a mapping label -> losses, e.g. SGD vs SAM) saved as a PNG."""
    fig = new_figure((6.0, 4.0))
    ax = fig.add_subplot()
    curves = losses.items() if isinstance(losses, Mapping) else [(None, losses)]
    for label, ys in curves:
        ax.plot(np.asarray(xs), np.asarray(ys), lw=1.5, label=label)
    if isinstance(losses, Mapping):
        ax.legend()
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def plot_loss_contour(
    alphas: Sequence[float] | np.ndarray,
    betas: Sequence[float] | np.ndarray,
    surface: np.ndarray,
    path: str | Path,
    *,
    levels: int = 30,
    title: str | None = None,
    log_scale: bool = False,
) -> Path:
    """Contour lines of a :func:`loss_surface_2d` result (``surface[i, j]`` at
    ``(alphas[j], betas[i])``), with the centre marked; ``log_scale`` contours ``log10(loss)``."""
    z = np.log10(np.maximum(surface, 1e-12)) if log_scale else np.asarray(surface)
    fig = new_figure((5.5, 4.5))
    ax = fig.add_subplot()
    cs = ax.contour(np.asarray(alphas), np.asarray(betas), z, levels=levels, cmap="viridis")
    ax.clabel(cs, inline=True, fontsize=6, fmt="%.2g")
    fig.colorbar(cs, ax=ax, label="log10 loss" if log_scale else "loss")
    ax.plot([0.0], [0.0], marker="+", color="black")
    ax.set_xlabel("alpha (direction 1)")
    ax.set_ylabel("beta (direction 2)")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def plot_loss_surface_3d(
    alphas: Sequence[float] | np.ndarray,
    betas: Sequence[float] | np.ndarray,
    surface: np.ndarray,
    path: str | Path,
    *,
    title: str | None = None,
    elev: float = 30.0,
    azim: float = -60.0,
) -> Path:
    """A 3-D surface plot of a :func:`loss_surface_2d` result."""
    fig = new_figure((6.0, 5.0))
    ax: Any = fig.add_subplot(projection="3d")
    xx, yy = np.meshgrid(np.asarray(alphas), np.asarray(betas))
    ax.plot_surface(xx, yy, np.asarray(surface), cmap="viridis", linewidth=0, antialiased=True)
    ax.view_init(elev=elev, azim=azim)
    ax.set_xlabel("alpha")
    ax.set_ylabel("beta")
    ax.set_zlabel("loss")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
