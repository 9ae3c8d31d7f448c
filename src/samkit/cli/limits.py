"""What an analysis may cost, checked before the work starts.

The argument types bound each number on its own (:mod:`samkit.domains`); these checks bound what
numbers cost together, or with the model: a 2-D landscape's grid (``--points`` squared loss
evaluations) and the vectors a Lanczos run keeps (steps x parameters, in float64). A refusal is a
:class:`~samkit.cli.args.CommandError` naming the flag and saying the cost, never an allocation
that fails after minutes or an out-of-memory kill.
"""

from __future__ import annotations

import argparse
import os

import torch

from samkit.cli.args import CommandError

__all__ = [
    "MAX_EVALUATIONS",
    "MAX_POINTS",
    "check_hessian_memory",
    "check_lanczos_memory",
    "check_landscape_cost",
    "device_memory",
]

#: Grid points per axis of a landscape (and along the line between two checkpoints).
MAX_POINTS = 10_000
#: Loss evaluations of one ``samkit landscape`` (each a pass over the data subset): a 1000 x 1000
#: grid; the default 21 x 21 grid is 441.
MAX_EVALUATIONS = 1_000_000

_FLOAT64_BYTES = 8  # the Lanczos vectors' dtype (samkit.analysis.hessian's default)


def check_landscape_cost(dims: int | None, points: int, line: bool, num_samples: int) -> None:
    """Refuse a landscape of more than :data:`MAX_EVALUATIONS` loss evaluations."""
    grid = points**dims if dims else 0
    evaluations = grid + (points if line else 0)
    if evaluations <= MAX_EVALUATIONS:
        return
    parts = []
    if dims:
        parts.append(f"a {dims}-D grid of {' x '.join([str(points)] * dims)} points")
    if line:
        parts.append(f"{points} points on the line")
    raise CommandError(
        f"--points {points}: {' and '.join(parts)} is {evaluations:,} loss evaluations, each over "
        f"up to {num_samples:,} examples (--num-samples); at most {MAX_EVALUATIONS:,}"
    )


def device_memory(device: torch.device) -> int | None:
    """The memory of ``device`` in bytes (the machine's RAM for the CPU), None if unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass
    return None


def check_lanczos_memory(flag: str, steps: int, dim: int, device: torch.device) -> None:
    """Refuse a Lanczos run whose ``steps`` vectors of ``dim`` float64 entries cannot fit in the
    memory of ``device`` (``flag`` is the option that set the steps, with its value)."""
    steps = min(steps, dim)  # Lanczos stops at the operator's size
    need = steps * dim * _FLOAT64_BYTES
    have = device_memory(device)
    if have is not None and need > have:
        raise CommandError(
            f"{flag}: Lanczos keeps {steps:,} vectors of the model's {dim:,} parameters in "
            f"float64 ({need / 2**30:,.1f} GiB), more than the {have / 2**30:,.1f} GiB of "
            f"memory of device {device}; ask for fewer steps"
        )


def check_hessian_memory(args: argparse.Namespace, dim: int, device: torch.device) -> None:
    """``samkit hessian``'s Lanczos runs (top-k; SLQ with --density) against the memory."""
    if args.method == "lanczos":
        k = args.top_k
        if args.max_steps is not None:
            check_lanczos_memory(f"--max-steps {args.max_steps}", args.max_steps, dim, device)
        else:  # samkit.analysis.hessian.lanczos's default number of steps
            check_lanczos_memory(f"--top-k {k}", max(3 * k, k + 50), dim, device)
    if args.density:
        steps = args.lanczos_steps
        check_lanczos_memory(f"--lanczos-steps {steps}", steps, dim, device)
