"""SAM sharpness and m-sharpness of a trained model (Foret et al., ICLR 2021).

Sharpness (Sec. 2, eq. 1; App. C.6 measures it with several projected gradient steps)::

    S_rho(w) = max_{||e||_2 <= rho} L(w + e) - L(w)

estimated by ``k`` steps of projected gradient ascent on the rho-ball. The first step is the SAM
step ``e_1 = rho g / ||g||`` (``g = grad L(w)``), then::

    e_{i+1} = Proj_{||e|| <= rho}(e_i + rho * g_i / ||g_i||),   g_i = grad L(w + e_i)

Every iterate is a feasible point, so ``max(L(w), L(w + e_1), ..., L(w + e_k)) - L(w)`` is a lower
bound on ``S_rho(w)``; keeping the best loss seen makes the estimate non-decreasing in ``k`` (and
>= 0, since ``e = 0`` is in the ball).

m-sharpness (Sec. 4.1): split the data into disjoint chunks of ``m`` examples, maximise over a
SEPARATE perturbation for each chunk and average::

    S_rho^m(w) = (1 / C) sum_{c=1..C} [ max_{||e_c|| <= rho} L_c(w + e_c) - L_c(w) ]

The paper finds that smaller ``m`` correlates better with the generalisation gap (Fig. 3, right).

All losses are means over fixed batches with the model in eval mode (BatchNorm running
statistics, no dropout). Gradients are taken with ``torch.autograd.grad``: ``.grad`` fields are
never touched, and the weights are restored exactly, in place, afterwards.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from samkit.analysis._utils import (
    Batch,
    LossFn,
    as_batch_list,
    batch_size,
    batch_weights,
    eval_mode,
    to_device,
    trainable_parameters,
)
from samkit.analysis.progress import progress_bar

__all__ = ["MSharpnessResult", "SharpnessResult", "m_sharpness", "sharpness"]


@dataclasses.dataclass
class SharpnessResult:
    """Projected-gradient-ascent estimate of ``max_{||e|| <= rho} L(w + e) - L(w)``.

    ``step_losses[i]`` is ``L(w + e_{i+1})`` (raw, may go down); ``sharpness_per_step[i]`` is the
    estimate after ``i + 1`` steps (non-decreasing); ``sharpness`` is the last of them.
    ``perturbation_norm`` is ``||e||`` at the best point (0 if no step improved on ``L(w)``).
    """

    sharpness: float
    loss: float
    max_loss: float
    rho: float
    steps: int
    step_losses: list[float]
    sharpness_per_step: list[float]
    perturbation_norm: float
    num_examples: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _global_norm(tensors: Sequence[Tensor]) -> float:
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))
    )


def _loss_and_grad(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[tuple[Any, Any]],
    weights: Sequence[float],
    params: Sequence[Tensor],
    need_grad: bool,
) -> tuple[float, list[Tensor] | None]:
    device = params[0].device
    total = 0.0
    grads = [torch.zeros_like(p) for p in params] if need_grad else None
    with torch.set_grad_enabled(need_grad):
        for (x, y), w in zip(batches, weights):
            loss = loss_fn(model(to_device(x, device)), to_device(y, device)) * w
            total += float(loss.detach())
            if grads is not None:
                gs = torch.autograd.grad(loss, params, allow_unused=True)
                for acc, g in zip(grads, gs):
                    if g is not None:
                        acc.add_(g)
    return total, grads


def sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    rho: float = 0.05,
    *,
    steps: int = 1,
    params: Iterable[Tensor] | None = None,
) -> SharpnessResult:
    """SAM sharpness ``max_{||e||_2 <= rho} L(w + e) - L(w)`` on ``batches`` by ``steps`` of
    projected gradient ascent (see the module docstring; ``steps=1`` is the SAM step itself).

    ``e`` ranges over the trainable parameters (or ``params``), with one global L2 norm as in SAM.
    Stops early (the estimate then stays constant) if the gradient is zero or non-finite.
    Cost: ``steps + 1`` forward passes and ``steps`` backward passes over all the batches.

    Args:
        model: the network (temporarily perturbed, then restored exactly in place).
        loss_fn: ``loss_fn(model(x), y)`` -> the batch's MEAN loss.
        batches: ``(x, y)`` pairs; ``L`` is their example-weighted mean loss.
        rho: radius of the L2 ball (SAM's default 0.05).
        steps: number of ascent steps ``k >= 1``.
    """
    if not (math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    batch_list = as_batch_list(batches)
    weights = batch_weights(batch_list)
    ps = list(params) if params is not None else trainable_parameters(model)
    if not ps:
        raise ValueError("the model has no trainable parameters")
    num_examples = sum(batch_size(b) for b in batch_list)
    clean = [p.detach().clone() for p in ps]
    step_losses: list[float] = []
    per_step: list[float] = []
    try:
        with eval_mode(model):
            loss0, grad = _loss_and_grad(model, loss_fn, batch_list, weights, ps, need_grad=True)
            best, best_norm = loss0, 0.0
            e = [torch.zeros_like(p) for p in ps]
            for i in range(steps):
                assert grad is not None  # computed for every step that is taken
                g_norm = _global_norm(grad)
                if not (math.isfinite(g_norm) and g_norm > 0 and rho > 0):
                    break
                for ei, gi in zip(e, grad):
                    ei.add_(gi, alpha=rho / g_norm)
                e_norm = _global_norm(e)
                if e_norm > rho:  # projection back onto the ball
                    for ei in e:
                        ei.mul_(rho / e_norm)
                    e_norm = rho
                with torch.no_grad():
                    for p, w, ei in zip(ps, clean, e):
                        p.copy_(w).add_(ei)
                last = i == steps - 1
                loss_i, grad = _loss_and_grad(
                    model, loss_fn, batch_list, weights, ps, need_grad=not last
                )
                step_losses.append(loss_i)
                if loss_i > best:
                    best, best_norm = loss_i, e_norm
                per_step.append(best - loss0)
    finally:
        with torch.no_grad():
            for p, w in zip(ps, clean):
                p.copy_(w)
    per_step += [best - loss0] * (steps - len(per_step))
    return SharpnessResult(
        sharpness=per_step[-1],
        loss=loss0,
        max_loss=best,
        rho=float(rho),
        steps=steps,
        step_losses=step_losses,
        sharpness_per_step=per_step,
        perturbation_norm=best_norm,
        num_examples=num_examples,
    )


@dataclasses.dataclass
class MSharpnessResult:
    """m-sharpness: the mean (and spread) over ``num_chunks`` disjoint chunks of ``m`` examples of
    each chunk's own sharpness estimate; ``values`` per chunk, ``mean_loss`` the chunks' mean
    ``L_c(w)``."""

    m: int
    rho: float
    steps: int
    sharpness: float
    std: float
    num_chunks: int
    values: list[float]
    mean_loss: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def m_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    m_values: Sequence[int],
    rho: float = 0.05,
    *,
    steps: int = 1,
    max_chunks: int | None = None,
    micro_batch_size: int | None = None,
    progress: bool | None = None,
) -> list[MSharpnessResult]:
    """m-sharpness (Foret et al., Sec. 4.1) for each ``m`` in ``m_values``.

    The batches are concatenated in order (shuffle beforehand if the order is meaningful) and
    split into ``N // m`` disjoint chunks of exactly ``m`` examples (an incomplete last chunk is
    dropped); ``max_chunks`` keeps only the first chunks to bound the cost. Each chunk gets its own
    :func:`sharpness` estimate (``steps`` ascent steps, its own perturbation); the result is their
    mean. ``micro_batch_size`` evaluates a chunk in pieces (same numbers, less memory) when ``m``
    is large. Inputs and targets must be tensors (concatenated along dim 0).
    """
    batch_list = as_batch_list(batches)
    if not all(isinstance(b[0], Tensor) and isinstance(b[1], Tensor) for b in batch_list):
        raise TypeError("m_sharpness needs tensor inputs and targets to split the data into chunks")
    xs = torch.cat([b[0] for b in batch_list])
    ys = torch.cat([b[1] for b in batch_list])
    n = int(ys.shape[0])
    plan = []
    for m in m_values:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"every m must be an integer >= 1, got {m!r}")
        if m > n:
            raise ValueError(f"m={m} is larger than the {n} examples given")
        chunks = n // m if max_chunks is None else min(n // m, max_chunks)
        plan.append((m, chunks))
    results = []
    total = sum(c for _, c in plan)
    bar = progress_bar(None, progress, total=total, desc="m-sharpness", unit="chunks")
    try:
        for m, chunks in plan:
            values, losses = [], []
            mb = micro_batch_size or m
            for c in range(chunks):
                x, y = xs[c * m : (c + 1) * m], ys[c * m : (c + 1) * m]
                pieces = [(x[i : i + mb], y[i : i + mb]) for i in range(0, m, mb)]
                r = sharpness(model, loss_fn, pieces, rho, steps=steps)
                values.append(r.sharpness)
                losses.append(r.loss)
                bar.update(1)
            results.append(
                MSharpnessResult(
                    m=m,
                    rho=float(rho),
                    steps=steps,
                    sharpness=statistics.fmean(values),
                    std=statistics.pstdev(values) if len(values) > 1 else 0.0,
                    num_chunks=chunks,
                    values=values,
                    mean_loss=statistics.fmean(losses),
                )
            )
    finally:
        bar.close()
    return results
