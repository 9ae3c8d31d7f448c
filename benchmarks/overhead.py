"""Step time and peak memory of samkit's sharpness-aware optimizers against plain SGD.

Run from the repository root::

    .venv/bin/python benchmarks/overhead.py                 # full run, a few minutes on 2 cores
    .venv/bin/python benchmarks/overhead.py --quick         # smoke run, well under a minute

Three models for whole training steps, each on a fixed synthetic batch (data loading is not
measured):

* ``small_cnn``: four 3x3 conv + BatchNorm + ReLU layers (16-32-64-128 channels, strides
  1-2-2-1), global average pooling and a linear head; 28x28x1 input; ~99k parameters in 14 tensors.
* ``mlp_30m``: a wide MLP on 32x32x3 input (flattened 3072), seven Linear(2048) + BatchNorm1d +
  ReLU blocks and a linear head; ~31.5M parameters in 30 tensors. A conv net of that size (e.g.
  WRN-28-10) takes tens of seconds per step on 2 CPU cores; the MLP takes well under a second per
  forward/backward, and it is the worst case for optimizer overhead: its compute per parameter
  (2 * batch FLOPs per forward) is the lowest of any architecture, so the per-parameter work of the
  optimizer weighs the most.
* ``wrn_28_10``: the seed system's default model, WideResNet-28-10 (~36.5M parameters), 32x32x3
  input, batch 16: the per-device batch of the seed's CIFAR runs (128 over 8 GPUs, SAM Sec. 3),
  i.e. what one replica computes per step, and the realistic ~30M-parameter case. (The whole batch
  of 128 takes tens of seconds per step on 2 CPU cores; the optimizer's cost per step does not
  depend on the batch, so its share only shrinks with a larger one.)

and a fourth case, ``many_tensors`` (issue 14), that times the optimizer calls alone:

* ``many_tensors``: 60 x (Linear(64, 64), Tanh) and a bias-free Linear(64, 10) head, 121 tensors
  of at most 4,096 elements, batch 8. Variants ``loop_sam`` (davda54/sam's algorithm, a Python
  loop over the tensors, re-written here from its description: ``PerTensorLoopSAM``), ``sam``
  and ``sam_no_foreach``, all around the same ``torch.optim.SGD(momentum=0.9)``. Timed: only
  ``first_step(zero_grad=True)`` + ``second_step(zero_grad=True)`` (wall and this thread's CPU
  time), and inside them the base SGD step, so "own" = optimizer - base step is each
  implementation's own work. Twice: ``in_step``, in real training steps (forward and backward
  between the calls, untimed), and ``hot``, the two calls back to back on fixed gradients (the
  code path's cost with warm caches). Rounds interleave the variants in rotated order; ratios
  are medians of per-round ratios.

Variants of the other three (each owns its own copy of the model, same initial weights; lr 0.01,
momentum 0.9, no weight decay, base optimizer ``torch.optim.SGD`` with its defaults):

* ``sgd``: zero_grad, one forward + backward, ``SGD.step()``.
* ``fwd_bwd_1x`` / ``fwd_bwd_2x``: one / two forward + backward passes, no optimizer; gradients
  are freed (set to None) at the same points as in ``sgd`` / ``sam`` (``zero_grad`` with
  ``set_to_none=True``), because on CPU freeing and re-allocating them is itself a cost.
* ``sam``: raw API, ``SAM(rho=0.05)``: backward, ``first_step(zero_grad=True)``, backward,
  ``second_step(zero_grad=True)``; ``foreach`` left at its default (on).
* ``sam_no_foreach``: the same with ``SAM(foreach=False)`` (per-tensor loops).
* ``sam_helper``: ``samkit.train.step.SharpnessAwareStep`` around the same SAM (BatchNorm running
  stats from the first pass only, RNG replay): what a training loop actually pays.
* ``esam_sharpness`` / ``esam_loss``: ``ESAM(beta=0.5, gamma=0.5).step(closure)`` with per-sample
  losses and ``sds_criterion="sharpness"`` (extra no-grad forward at w + e) / ``"loss"`` (none).
* ``gsam`` / ``wsam`` / ``fsam``: the SAM family's two-pass variants from the optimizer registry
  with its defaults, raw API as ``sam`` (their extra work: keeping the clean gradient and the
  combination, or the gradients' moving average).
* ``looksam`` / ``rst`` / ``msam``: the registry's methods that take fewer passes, through
  ``step(closure)`` (which runs the second pass only when the method ascends): LookSAM (k = 5),
  RST (p = 0.5, seeded draws, so the same steps ascend in every run), Momentum-SAM (one pass).
* ``saf`` / ``mesa``: no ascent, the loss changes (``samkit.train.trajectory``): the ``sgd`` step
  on the cross-entropy plus the trajectory term from the first step, with the registry's
  defaults. SAF reads and writes the batch's stored logits (each step is a new "epoch" whose
  teacher is the step before); MESA adds its teacher's no-grad forward and the EMA update.

Timing: every variant first runs ``warmup`` untimed steps; then rounds, each visiting all
variants in a rotated order (round r starts at variant r) and, for each, running ``round_warmup``
untimed steps and ``steps_per_sample`` timed steps whose mean is one sample. Each sample also
records how long this process's threads were runnable but waiting for a CPU (Linux schedstat
``run_delay``, summed over threads) as a fraction of its wall time; a sample is *quiet* when that
is below ``--quiet-threshold`` (5%). On a shared 2-core machine another busy process makes
multi-threaded CPU kernels stall at every OpenMP barrier (steps 10x slower, measured here), so:
at least ``--repeats`` rounds run, and more, up to ``--budget`` seconds, until every variant has
``--repeats`` quiet samples. Statistics use the quiet samples when there are >= 3 (column
"quiet/all"; JSON ``basis``), else all samples. Ratios and differences between variants are also
computed per round (paired: same round, same machine state; only rounds where all variants
involved were quiet, if >= 3 such rounds) and their median reported. Raw samples and their wait
fractions are in the JSON.

Derived numbers:

* optimizer overhead = ``sam - fwd_bwd_2x``: everything SAM's optimizer does (ascent norm, backup,
  perturbation, restore, second-step norm, AND the base SGD step), as a % of a ``sam`` step.
* SAM-specific overhead = ``(sam - fwd_bwd_2x) - (sgd - fwd_bwd_1x)``: the same minus what the
  base SGD step itself costs, i.e. what SAM adds on top of SGD's own optimizer work.
* optimizer share (the "optimizer-only overhead" target): ``first_step + second_step + zero_grad``
  as a fraction of the whole raw SAM step, every phase timed inside the same step (the SAM phase
  breakdown), so no other variant's noise enters it.

Allocator (CPU): by default (``--malloc tuned``) the script first tells glibc's malloc to keep
freed memory (``mallopt``: mmap threshold 32 MiB, its maximum, and no trimming). Under glibc's own
settings (``--malloc default``) a loop of bare training steps hands its activations and gradients
back to the kernel after every step and page-faults them in again: thousands of faults per step
(column ``faults``), which slow the steps by an amount that changes from run to run and drown
ratios such as SAM / SGD. ``samkit train``'s loop is not slowed this way (it was no faster under
the tuned setting; ``benchmarks/README.md``), so the tuned setting is also the closer one to real
training. The JSON records what was done (``machine.malloc``).

Memory: each variant is also run in a fresh subprocess (``--_memory-probe``): build the model,
optimizer and batch, ``gc.collect()`` and glibc ``malloc_trim(0)`` (so the RSS is live memory),
reset the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), run 3
steps and read ``VmHWM``. ``delta_mb`` = peak RSS during the steps minus the RSS just before
them: gradients, optimizer state (momentum, SAM's clean-weight backup), activations and autograd
temporaries, allocator slack; not the model weights, the batch or torch itself. (``ru_maxrss`` is
no use here: Linux carries the parent's peak into a child across fork + exec; it is only the
non-Linux fallback.) On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime as dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import samkit  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from samkit.optim import ESAM, SAM, create_optimizer
from samkit.optim import _functional as SF
from samkit.train.step import SharpnessAwareStep
from samkit.train.trajectory import MESA, SAF

ROOT = Path(__file__).resolve().parents[1]
LR, MOMENTUM, RHO, BETA, GAMMA = 0.01, 0.9, 0.05, 0.5, 0.5
BATCH = 128
BATCH_SIZES = {"small_cnn": BATCH, "mlp_30m": BATCH, "wrn_28_10": 16}

VARIANTS: dict[str, str] = {
    "sgd": "SGD(momentum=0.9): 1 fwd/bwd + step",
    "fwd_bwd_1x": "1 fwd/bwd, no optimizer",
    "fwd_bwd_2x": "2 fwd/bwd, no optimizer",
    "sam": "SAM raw first_step/second_step (foreach)",
    "sam_no_foreach": "SAM raw, foreach=False",
    "sam_helper": "SAM via SharpnessAwareStep",
    "esam_sharpness": 'ESAM.step, sds_criterion="sharpness"',
    "esam_loss": 'ESAM.step, sds_criterion="loss"',
    "gsam": "GSAM raw first_step/second_step (registry defaults)",
    "wsam": "WSAM raw first_step/second_step (decoupled)",
    "fsam": "Friendly-SAM raw first_step/second_step",
    "looksam": "LookSAM.step(closure), k=5 (1.2 passes per step)",
    "rst": "RST.step(closure), p=0.5 (1.5 passes per step on average)",
    "msam": "Momentum-SAM.step(closure) (1 pass)",
    "saf": "SAF: SGD on CE + trajectory loss against stored logits (1 pass)",
    "mesa": "MESA: SGD on CE + trajectory loss against an EMA teacher (1 pass + 1 forward)",
}

# Per-model timing defaults: (repeats, steps_per_sample, round_warmup, warmup).
TIMING = {"small_cnn": (25, 5, 1, 3), "mlp_30m": (8, 1, 0, 2), "wrn_28_10": (5, 1, 0, 1)}
QUICK_TIMING = (3, 1, 0, 1)
# Seconds of timing rounds per model beyond which no more rounds start to collect quiet samples.
BUDGET_S = {"small_cnn": 120.0, "mlp_30m": 180.0, "wrn_28_10": 300.0}
QUICK_BUDGET_S = 5.0
TASKS_DIR = Path("/proc/self/task")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc <malloc.h>
QUIET_THRESHOLD = 0.05  # "quiet" sample: our threads waited for a CPU < 5% of its wall time
MIN_QUIET = 3  # fewer quiet samples than this: statistics fall back to all samples

TARGETS = {
    "sam_over_sgd_small_cnn": 2.05,  # SAM / SGD step time on the small CNN
    "optimizer_overhead_pct": 3.0,  # (SAM - 2x fwd/bwd) / SAM, in %
    "esam_loss_over_sgd": 1.45,  # ESAM(sds_criterion="loss") / SGD
}


# -- models ------------------------------------------------------------------------------------


def small_cnn() -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        return [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(1, 16, 1),
        *block(16, 32, 2),
        *block(32, 64, 2),
        *block(64, 128, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def wide_mlp(width: int, blocks: int, in_features: int = 3 * 32 * 32) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(blocks):
        layers += [
            nn.Linear(in_features if i == 0 else width, width),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
        ]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def build(model_name: str, quick: bool, device: torch.device) -> tuple[nn.Module, Tensor, Tensor]:
    """The model (seeded init) and a fixed synthetic batch."""
    torch.manual_seed(0)
    if model_name == "small_cnn":
        model, shape = small_cnn(), (BATCH_SIZES[model_name], 1, 28, 28)
    elif model_name == "mlp_30m":
        # --quick shrinks it so the smoke run stays fast; the JSON records the real size
        model = wide_mlp(256, 2) if quick else wide_mlp(2048, 7)
        shape = (BATCH_SIZES[model_name], 3, 32, 32)
    elif model_name == "wrn_28_10":
        from samkit.models import create_model

        # --quick uses WRN-10-1 so the smoke run stays fast; the JSON records the real size
        model = create_model("wrn_10_1" if quick else "WideResnet28x10", num_classes=10)
        shape = (BATCH_SIZES[model_name], 3, 32, 32)
    else:
        raise ValueError(model_name)
    x = torch.randn(shape)
    y = torch.randint(0, 10, (shape[0],))
    return model.to(device).train(), x.to(device), y.to(device)


def describe(model: nn.Module, x: Tensor) -> dict[str, Any]:
    params = list(model.parameters())
    return {
        "parameters": sum(p.numel() for p in params),
        "parameter_tensors": len(params),
        "batch_size": x.shape[0],
        "input_shape": list(x.shape[1:]),
    }


# -- variants ----------------------------------------------------------------------------------


def per_sample_ce(out: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(out, target, reduction="none")


def make_variant(
    name: str, template: nn.Module, x: Tensor, y: Tensor
) -> tuple[Callable[[], None], dict[str, Any]]:
    """A zero-argument step function for ``name`` on its own copy of ``template``."""
    model = copy.deepcopy(template)
    params = list(model.parameters())
    objs: dict[str, Any] = {"model": model}

    def set_grads_none() -> None:
        for p in params:
            p.grad = None

    if name == "sgd":
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    elif name == "fwd_bwd_1x":  # = sgd without the optimizer (grads freed at the same point)

        def step() -> None:
            set_grads_none()
            F.cross_entropy(model(x), y).backward()

    elif name == "fwd_bwd_2x":  # = sam without the optimizer (grads freed at the same points)

        def step() -> None:
            F.cross_entropy(model(x), y).backward()
            set_grads_none()
            F.cross_entropy(model(x), y).backward()
            set_grads_none()

    elif name in ("sam", "sam_no_foreach", "sam_helper"):
        foreach = False if name == "sam_no_foreach" else None
        opt = SAM(params, torch.optim.SGD, rho=RHO, foreach=foreach, lr=LR, momentum=MOMENTUM)
        objs["opt"] = opt
        if name == "sam_helper":
            helper = SharpnessAwareStep(model, opt, per_sample_ce)

            def step() -> None:
                helper(x, y)

        else:

            def step() -> None:
                F.cross_entropy(model(x), y).backward()
                opt.first_step(zero_grad=True)
                F.cross_entropy(model(x), y).backward()
                opt.second_step(zero_grad=True)

    elif name in ("esam_sharpness", "esam_loss"):
        criterion = name.removeprefix("esam_")
        opt = ESAM(
            params,
            torch.optim.SGD,
            rho=RHO,
            beta=BETA,
            gamma=GAMMA,
            sds_criterion=criterion,
            lr=LR,
            momentum=MOMENTUM,
        )
        objs["opt"] = opt

        def closure(index: Tensor | None = None) -> Tensor:
            xb, yb = (x, y) if index is None else (x[index], y[index])
            return per_sample_ce(model(xb), yb)

        def step() -> None:
            opt.step(closure)

    elif name in ("gsam", "wsam", "fsam"):  # the SAM family: the registry's defaults
        opt = create_optimizer(name, params, torch.optim.SGD, lr=LR, momentum=MOMENTUM)
        objs["opt"] = opt

        def step() -> None:
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)

    elif name in ("looksam", "rst", "msam"):  # fewer passes: step(closure) decides how many
        opt = create_optimizer(name, params, torch.optim.SGD, lr=LR, momentum=MOMENTUM)
        objs["opt"] = opt

        def loss_closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        def step() -> None:
            opt.step(loss_closure)

    elif name in ("saf", "mesa"):  # the loss changes, not the step: SGD on CE + the term
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
        index = torch.arange(x.shape[0])
        if name == "saf":
            with torch.no_grad():
                out = model(x)
            term: SAF | MESA = SAF(x.shape[0], out.shape[1], start_epoch=0, epochs_back=1)
            term.prepare(x, index, 0)
            term.after_step(model, out, True)  # the logits the first timed step reads
        else:
            term = MESA(model, start_epoch=0)
        objs["opt"], loss_fn, epoch = opt, term.wrap(per_sample_ce), [0]

        def step() -> None:
            epoch[0] += 1  # SAF: the teacher is the previous step's logits (E = 1)
            term.prepare(x, index, epoch[0])
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss_fn(out, y).mean().backward()
            opt.step()
            term.after_step(model, out.detach(), True)

    else:
        raise ValueError(f"unknown variant {name!r}")
    return step, objs


# -- timing ------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sched_us() -> tuple[float, float] | None:
    """(on-CPU, runnable-but-waiting) microseconds of this process's threads so far, from Linux
    schedstat; None where unavailable."""
    run = wait = 0
    try:
        for task in TASKS_DIR.iterdir():
            try:
                fields = (task / "schedstat").read_text().split()
            except FileNotFoundError:  # thread exited meanwhile
                continue
            run += int(fields[0])
            wait += int(fields[1])
    except (OSError, IndexError, ValueError):
        return None
    return run / 1e3, wait / 1e3


class Window:
    """Wall time of a block and how much of it this process's threads spent waiting for a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Window:
        sync(self.device)
        self.s0 = sched_us()
        self.faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.wall = time.perf_counter() - self.t0
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults0
        s1 = sched_us()
        if self.s0 is None or s1 is None:
            self.cpu_ms = self.stall = None
        else:
            self.cpu_ms = (s1[0] - self.s0[0]) / 1e3
            self.stall = (s1[1] - self.s0[1]) / 1e6 / self.wall


def timed(
    fn: Callable[[], None], n: int, device: torch.device
) -> tuple[float, float | None, float | None, float]:
    """Per call: mean wall ms, the wait fraction of the window, mean on-CPU ms (all threads),
    mean minor page faults."""
    with Window(device) as w:
        for _ in range(n):
            fn()
    return w.wall * 1e3 / n, w.stall, None if w.cpu_ms is None else w.cpu_ms / n, w.faults / n


def quantiles(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "min": min(xs), "n": len(xs)}


class Samples:
    """Per-variant timings with the wait fraction of each; ``quiet`` ones saw no contention."""

    def __init__(self, names: list[str], threshold: float) -> None:
        self.ms: dict[str, list[float]] = {n: [] for n in names}
        self.stall: dict[str, list[float | None]] = {n: [] for n in names}
        self.cpu_ms: dict[str, list[float | None]] = {n: [] for n in names}
        self.faults: dict[str, list[float]] = {n: [] for n in names}
        self.threshold = threshold

    def add(
        self, name: str, ms: float, stall: float | None, cpu_ms: float | None, faults: float
    ) -> None:
        self.ms[name].append(ms)
        self.stall[name].append(stall)
        self.cpu_ms[name].append(cpu_ms)
        self.faults[name].append(faults)

    def is_quiet(self, name: str, i: int) -> bool:
        s = self.stall[name][i]
        return s is None or s <= self.threshold

    def quiet(self, name: str) -> list[float]:
        return [x for i, x in enumerate(self.ms[name]) if self.is_quiet(name, i)]

    @property
    def basis(self) -> str:
        """ "quiet" when every variant has >= MIN_QUIET quiet samples, else "all" (for all)."""
        return "quiet" if all(len(self.quiet(v)) >= MIN_QUIET for v in self.ms) else "all"

    def headline(self, name: str) -> dict[str, float]:
        return quantiles(self.quiet(name) if self.basis == "quiet" else self.ms[name])

    def rounds(self, names: list[str]) -> tuple[list[int], str]:
        """Round indices to pair ``names`` over: those where all were quiet, if >= MIN_QUIET."""
        n = min(len(self.ms[v]) for v in names)
        quiet = [i for i in range(n) if all(self.is_quiet(v, i) for v in names)]
        return (quiet, "quiet") if len(quiet) >= MIN_QUIET else (list(range(n)), "all")

    def paired(self, a: str, b: str, op: str) -> dict[str, Any]:
        idx, basis = self.rounds([a, b])
        xa, xb = self.ms[a], self.ms[b]
        vals = [xa[i] - xb[i] if op == "-" else xa[i] / xb[i] for i in idx]
        return dict(quantiles(vals), basis=basis)


def run_timing(
    steps: dict[str, Callable[[], None]],
    repeats: int,
    steps_per_sample: int,
    round_warmup: int,
    warmup: int,
    budget_s: float,
    threshold: float,
    device: torch.device,
) -> Samples:
    """Round-robin: at least ``repeats`` rounds; more, within ``budget_s``, until every variant has
    ``repeats`` quiet samples."""
    names = list(steps)
    t_start = time.perf_counter()
    for name in names:
        for _ in range(warmup):
            steps[name]()
    sync(device)
    samples = Samples(names, threshold)
    r = 0
    while True:
        enough = all(len(samples.quiet(n)) >= repeats for n in names)
        if r >= repeats and (enough or time.perf_counter() - t_start > budget_s):
            break
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            for _ in range(round_warmup):
                steps[name]()
            samples.add(name, *timed(steps[name], steps_per_sample, device))
        r += 1
    return samples


# -- breakdown of one SAM step -----------------------------------------------------------------


# The phases of one raw SAM step as the breakdown times them, and those that are optimizer work.
OPTIMIZER = ("first_step", "second_step", "  zero_grad")
STEP = ("forward_1", "backward_1", "forward_2", "backward_2", *OPTIMIZER)


def sam_breakdown(
    template: nn.Module,
    x: Tensor,
    y: Tensor,
    foreach: bool,
    repeats: int,
    threshold: float,
    device: torch.device,
) -> dict[str, Any]:
    """Median ms of each phase of a raw SAM step, and of the tensor-list work inside the two
    optimizer calls, re-timed in isolation with samkit's own primitives.

    ``second_step`` = unperturb (copy back) + grad_norm (the clipping / skip check) + the base
    SGD step + zero_grad. ``first_step`` = global norm + clean-weight backup copy + perturbation add
    (+ zero_grad).
    """
    model = copy.deepcopy(template)
    params = list(model.parameters())
    opt = SAM(params, torch.optim.SGD, rho=RHO, foreach=foreach, lr=LR, momentum=MOMENTUM)
    sgd = torch.optim.SGD(copy.deepcopy(template).parameters(), lr=LR, momentum=MOMENTUM)
    phases: dict[str, list[float]] = {
        k: []
        for k in (
            "forward_1",
            "backward_1",
            "first_step",
            "forward_2",
            "backward_2",
            "second_step",
            "  norm (first_step)",
            "  backup copy (first_step)",
            "  perturb add (first_step)",
            "  unperturb (second_step)",
            "  grad_norm (second_step)",
            "  base SGD step (second_step)",
            "  zero_grad",
        )
    }

    stalls: dict[str, list[float | None]] = {k: [] for k in phases}

    def clock(key: str, fn: Callable[[], Any]) -> Any:
        with Window(device) as w:
            out = fn()
        phases[key].append(w.wall * 1e3)
        stalls[key].append(w.stall)
        return out

    fe = foreach
    backup = [torch.zeros_like(p) for p in params]  # reused, like SAM's own backup buffers

    def isolated_primitives(params: list[Tensor], grads: list[Tensor]) -> None:
        """This step's real gradients, a scratch copy of the weights (weights untouched)."""
        norm = clock("  norm (first_step)", lambda: SF.global_norm(grads, foreach=fe).item())
        clock("  backup copy (first_step)", lambda: SF.copy_(backup, params, foreach=fe))
        alpha = RHO / (norm + 1e-12)
        clock("  perturb add (first_step)", lambda: SF.add_(backup, grads, alpha=alpha, foreach=fe))
        clock("  unperturb (second_step)", lambda: SF.copy_(backup, params, foreach=fe))
        clock("  grad_norm (second_step)", opt.grad_norm)

    for _ in range(repeats + 2):
        loss = clock("forward_1", lambda: F.cross_entropy(model(x), y))
        clock("backward_1", loss.backward)
        isolated_primitives(params, [p.grad for p in params])
        clock("first_step", lambda: opt.first_step(zero_grad=True))
        loss = clock("forward_2", lambda: F.cross_entropy(model(x), y))
        clock("backward_2", loss.backward)
        clock("second_step", lambda: opt.second_step(zero_grad=False))
        clock("  zero_grad", lambda: opt.zero_grad(set_to_none=True))
        # the base step on its own: a separate SGD over same-shaped tensors, random gradients
        for p, q in zip(sgd.param_groups[0]["params"], params):
            p.grad = torch.randn_like(q)
        clock("  base SGD step (second_step)", sgd.step)
        sgd.zero_grad(set_to_none=True)
    medians, quiet_n = {}, {}
    for k, v in phases.items():  # drop 2 warm-up steps; median of the quiet calls if enough
        pairs = list(zip(v, stalls[k]))[2:]
        quiet = [ms for ms, st in pairs if st is None or st <= threshold]
        medians[k] = statistics.median(
            quiet if len(quiet) >= MIN_QUIET else [ms for ms, _ in pairs]
        )
        quiet_n[k] = len(quiet)
    # The optimizer's share of each whole SAM step, timed inside that very step: no other
    # variant's noise enters it (unlike sam - fwd_bwd_2x, a difference of two noisy medians).
    calls = range(2, len(phases["forward_1"]))
    quiet_calls = [
        i for i in calls if all(stalls[k][i] is None or stalls[k][i] <= threshold for k in STEP)
    ]
    use = quiet_calls if len(quiet_calls) >= MIN_QUIET else list(calls)
    shares = [
        100 * sum(phases[k][i] for k in OPTIMIZER) / sum(phases[k][i] for k in STEP) for i in use
    ]
    return {
        "median_ms": medians,
        "quiet_n": quiet_n,
        "calls": repeats,
        "optimizer_share_pct": statistics.median(shares),
        "optimizer_share_samples_pct": shares,
        "optimizer_share_basis": "quiet" if use is quiet_calls else "all",
    }


# -- many small tensors: optimizer-only time against a per-tensor loop ---------------------------

#: The many-tensor case (issue 14): 60 x Linear(64, 64) + Tanh and a bias-free Linear(64, 10)
#: head, 121 parameter tensors of at most 4,096 elements, batch 8: the optimizer's fixed cost per
#: tensor dominates, as in a transformer's hundreds of small tensors (norms, biases).
MANY_LAYERS, MANY_WIDTH, MANY_BATCH = 60, 64, 8
MANY_VARIANTS: dict[str, str] = {
    "loop_sam": "davda54/sam's algorithm, a Python loop over tensors (written here from it)",
    "sam": "samkit SAM, foreach default (on)",
    "sam_no_foreach": "samkit SAM(foreach=False), the per-tensor reference path",
    "sam_flat": "samkit SAM(flat=True): parameters and gradients in one buffer",
}
# (rounds, timed steps per sample, untimed steps before each sample, warm-up steps)
MANY_TIMING, MANY_QUICK_TIMING = (30, 10, 2, 20), (3, 3, 1, 2)
MANY_BUDGET_S, MANY_QUICK_BUDGET_S = 120.0, 5.0
#: optimizer-only time, samkit SAM(flat=True) (the opt-in for many tensors) / per-tensor loop
TARGETS["many_tensor_sam_over_loop"] = 0.3


def many_tensor_mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(MANY_LAYERS):
        layers += [nn.Linear(MANY_WIDTH, MANY_WIDTH), nn.Tanh()]
    layers.append(nn.Linear(MANY_WIDTH, 10, bias=False))
    return nn.Sequential(*layers)


class PerTensorLoopSAM:
    """SAM as davda54/sam (github.com/davda54/sam, ``sam.py``) computes it, re-written here from
    its published algorithm, not copied, for the many-tensor comparison (non-adaptive case):

    * ``first_step``: ``||g||`` = the 2-norm of the stack of the per-tensor gradient norms;
      ``scale = rho / (||g|| + 1e-12)``; for each parameter with a gradient, in a Python loop:
      keep a clone of its weights in this optimizer's state, then ``p.add_(p.grad * scale)``.
    * ``second_step``: for each such parameter ``p.data = old_p`` (the clone becomes the weights),
      then the base optimizer's step.

    The original also multiplies each gradient by ``1.0`` in the norm and in ``e_w`` (a copy per
    tensor, for its adaptive variant); that is left out, so this loop is if anything faster than
    the original. No non-finite check, no exact in-place restore: the cost of those is samkit's.
    """

    def __init__(self, params: list[Tensor], rho: float, **base_kwargs: Any) -> None:
        self.params, self.rho = params, rho
        self.base_optimizer = torch.optim.SGD(params, **base_kwargs)
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        with_grad = [p for p in self.params if p.grad is not None]
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in with_grad]), p=2)
        scale = self.rho / (norm + 1e-12)
        for p in with_grad:
            self.state.setdefault(p, {})["old_p"] = p.data.clone()
            p.add_(p.grad * scale.to(p))
        if zero_grad:
            self.base_optimizer.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for p in self.params:
            if p.grad is not None and p in self.state:
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.base_optimizer.zero_grad()


class OptimizerClock:
    """Wall and on-CPU (this thread) time of the optimizer calls of a step, and of the base
    optimizer's step inside them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.wall = self.cpu = self.base_wall = self.base_cpu = 0.0

    def call(self, fn: Callable[[], Any], base: bool = False) -> Any:
        """Run ``fn``, adding its time to the optimizer total (or, nested inside it, to the base
        step's: ``base``)."""
        sync(self.device)
        w0, c0 = time.perf_counter(), time.thread_time()
        out = fn()
        sync(self.device)
        w, c = time.perf_counter() - w0, time.thread_time() - c0
        if base:
            self.base_wall += w
            self.base_cpu += c
        else:
            self.wall += w
            self.cpu += c
        return out

    def wrap_base(self, opt: Any) -> None:
        step = opt.step
        opt.step = lambda *a, **k: self.call(lambda: step(*a, **k), base=True)


def many_optimizer(name: str, params: list[Tensor]) -> Any:
    if name == "loop_sam":
        return PerTensorLoopSAM(params, RHO, lr=LR, momentum=MOMENTUM)
    foreach = False if name == "sam_no_foreach" else None
    flat = name == "sam_flat"
    return SAM(
        params, torch.optim.SGD, rho=RHO, foreach=foreach, flat=flat, lr=LR, momentum=MOMENTUM
    )


def make_many_variant(
    name: str, template: nn.Module, x: Tensor, y: Tensor, clock: OptimizerClock, hot: bool
) -> Callable[[], None]:
    """One step of ``name`` on its own copy of the model; only the two optimizer calls (and the
    base step within them) are clocked, not the forward and backward passes.

    ``hot``: no forward or backward at all, the two calls back to back on fixed gradients, so
    the optimizer finds its code and data in the caches (what its own code path costs); else a
    real training step, where the forward and backward passes have evicted them in between."""
    model = copy.deepcopy(template)
    params = list(model.parameters())
    opt = many_optimizer(name, params)
    clock.wrap_base(opt.base_optimizer)
    if hot:
        gen = torch.Generator().manual_seed(1)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(p)

        def hot_step() -> None:
            clock.call(opt.first_step)
            clock.call(opt.second_step)

        return hot_step

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        clock.call(lambda: opt.first_step(zero_grad=True))
        F.cross_entropy(model(x), y).backward()
        clock.call(lambda: opt.second_step(zero_grad=True))

    return step


def run_many_tensors(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Optimizer-only ms per step (first_step + second_step; the base SGD step inside them also
    reported on its own) of samkit's SAM and the per-tensor loop, in a training step and hot."""
    torch.manual_seed(0)
    template = many_tensor_mlp().to(device)
    x = torch.randn(MANY_BATCH, MANY_WIDTH, device=device)
    y = torch.randint(0, 10, (MANY_BATCH,), device=device)
    timing = MANY_QUICK_TIMING if args.quick else MANY_TIMING
    budget = args.budget or (MANY_QUICK_BUDGET_S if args.quick else MANY_BUDGET_S)
    res: dict[str, Any] = {
        "model": {
            **describe(template, x),
            "architecture": f"{MANY_LAYERS} x (Linear({MANY_WIDTH}, {MANY_WIDTH}), Tanh), "
            f"Linear({MANY_WIDTH}, 10, bias=False)",
        },
        "what": "ms per step of first_step(zero_grad=True) + second_step(zero_grad=True), "
        "forward and backward excluded; base_step: the SGD(momentum) step inside second_step, "
        "the same torch.optim.SGD (CPU default: per-tensor) in every variant; own = optimizer - "
        "base_step. in_step: in real training steps (forward and backward between the calls); "
        "hot: the two calls back to back on fixed gradients (no zero_grad). Ratios are medians "
        "over rounds of per-round ratios (same round, same machine state).",
    }
    for context in ("in_step", "hot"):
        print(f"[many_tensors] {context} ...", flush=True)
        res[context] = _time_many(template, x, y, context == "hot", timing, budget, args, device)
    value = res["in_step"]["paired_ratios"]["sam_flat_over_loop_sam"]["optimizer"]
    limit = TARGETS["many_tensor_sam_over_loop"]
    res["targets"] = [
        {
            "name": "SAM(flat=True) / per-tensor loop, optimizer-only time in a training step "
            "(many tensors)",
            "value": value,
            "limit": limit,
            "met": bool(value <= limit),
            "conclusive": res["in_step"]["basis"] == "quiet",
        }
    ]
    return res


def _time_many(
    template: nn.Module,
    x: Tensor,
    y: Tensor,
    hot: bool,
    timing: tuple[int, int, int, int],
    budget: float,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """Interleaved rounds (rotated order) of every many-tensor variant; per-variant medians and
    per-round paired ratios against the loop, over the quiet rounds when there are enough."""
    rounds, per_sample, round_warmup, warmup = timing
    rounds = args.repeats or rounds
    names = list(MANY_VARIANTS)
    clocks = {n: OptimizerClock(device) for n in names}
    steps = {n: make_many_variant(n, template, x, y, clocks[n], hot) for n in names}
    for n in names:
        for _ in range(warmup):
            steps[n]()
    keys = ("wall", "cpu", "base_wall", "base_cpu")
    samples: dict[str, dict[str, list[float]]] = {
        n: {k: [] for k in (*keys, "step_wall")} for n in names
    }
    stall: dict[str, list[float | None]] = {n: [] for n in names}

    def quiet_rounds() -> list[int]:
        return [
            i
            for i in range(len(stall[names[0]]))
            if all(stall[n][i] is None or stall[n][i] <= args.quiet_threshold for n in names)
        ]

    t0, r = time.perf_counter(), 0
    while r < rounds or (len(quiet_rounds()) < rounds and time.perf_counter() - t0 < budget):
        for n in names[r % len(names) :] + names[: r % len(names)]:  # rotated: A B C, B C A, ...
            for _ in range(round_warmup):
                steps[n]()
            clocks[n].reset()
            with Window(device) as w:
                start = time.perf_counter()
                for _ in range(per_sample):
                    steps[n]()
                whole = time.perf_counter() - start
            for k in keys:
                samples[n][k].append(getattr(clocks[n], k) * 1e3 / per_sample)
            samples[n]["step_wall"].append(whole * 1e3 / per_sample)
            stall[n].append(w.stall)
        r += 1
    quiet = quiet_rounds()
    idx, basis = (quiet, "quiet") if len(quiet) >= MIN_QUIET else (list(range(r)), "all")

    def per_round(n: str, k: str, own: bool = False) -> list[float]:
        """The optimizer calls' time per step in each round used (``own``: minus the base step,
        which is timed inside them)."""
        s = samples[n]
        return [s[k][i] - (s["base_" + k][i] if own else 0.0) for i in idx]

    def paired(a: str, k: str, own: bool = False) -> float:
        pairs = zip(per_round(a, k, own), per_round("loop_sam", k, own))
        return statistics.median(mine / loop for mine, loop in pairs)

    variants = {
        n: {
            "description": MANY_VARIANTS[n],
            "optimizer_ms": statistics.median(per_round(n, "wall")),
            "optimizer_cpu_ms": statistics.median(per_round(n, "cpu")),
            "base_step_ms": statistics.median(per_round(n, "base_wall")),
            "own_ms": statistics.median(per_round(n, "wall", own=True)),
            "own_cpu_ms": statistics.median(per_round(n, "cpu", own=True)),
            # the whole step (in_step: forward and backward too, e.g. flat=True's gradient hooks)
            "step_ms": statistics.median(per_round(n, "step_wall")),
            "samples_ms": samples[n],
            "samples_cpu_wait_fraction": stall[n],
        }
        for n in names
    }
    ratios = {
        f"{a}_over_loop_sam": {
            "optimizer": paired(a, "wall"),
            "optimizer_cpu": paired(a, "cpu"),
            "own": paired(a, "wall", own=True),
            "own_cpu": paired(a, "cpu", own=True),
            "step": paired(a, "step_wall"),
        }
        for a in ("sam", "sam_no_foreach", "sam_flat")
    }
    return {
        "variants": variants,
        "paired_ratios": ratios,
        "basis": basis,
        "rounds": r,
        "quiet_rounds": len(quiet),
        "steps_per_sample": per_sample,
    }


def print_many_table(res: dict[str, Any]) -> None:
    d = res["model"]
    print(
        f"\n== many_tensors: {d['architecture']}: {d['parameter_tensors']} tensors, "
        f"{d['parameters']:,} params, batch {d['batch_size']}; optimizer calls only"
    )
    for context in ("in_step", "hot"):
        c = res[context]
        print(
            f"-- {context}: {c['rounds']} rounds ({c['quiet_rounds']} quiet) x "
            f"{c['steps_per_sample']} steps; statistics over {c['basis']} rounds"
        )
        print(
            f"{'variant':<15} {'optimizer ms':>12} {'cpu ms':>7} {'base step ms':>12} "
            f"{'own ms':>7} {'own cpu ms':>10} {'step ms':>8}  description"
        )
        for n, v in c["variants"].items():
            print(
                f"{n:<15} {v['optimizer_ms']:>12.3f} {v['optimizer_cpu_ms']:>7.3f} "
                f"{v['base_step_ms']:>12.3f} {v['own_ms']:>7.3f} {v['own_cpu_ms']:>10.3f} "
                f"{v['step_ms']:>8.3f}  {v['description']}"
            )
        for name, r in c["paired_ratios"].items():
            print(
                f"{name} (paired): optimizer {r['optimizer']:.3f} (cpu {r['optimizer_cpu']:.3f});"
                f" without the base step {r['own']:.3f} (cpu {r['own_cpu']:.3f});"
                f" whole step {r['step']:.3f}"
            )
    for tg in res["targets"]:
        status = "PASS" if tg["met"] else "FAIL"
        note = "" if tg["conclusive"] else " (contended run: not conclusive)"
        print(f"target {tg['name']}: {tg['value']:.3f} <= {tg['limit']} -> {status}{note}")


# -- memory ------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_probe(model_name: str, variant: str, quick: bool, device: torch.device) -> dict:
    """Run in a fresh process: peak memory of a few steps of one variant."""
    template, x, y = build(model_name, quick, device)
    step, _ = make_variant(variant, template, x, y)
    del template
    steps = 1 if quick else 3
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {
            "method": "torch.cuda.max_memory_allocated - memory_allocated before the steps",
            "baseline_mb": base / 2**20,
            "peak_mb": peak / 2**20,
            "delta_mb": (peak - base) / 2**20,
        }
    gc.collect()
    trimmed = _malloc_trim()  # hand freed heap back to the OS: RSS before = live memory
    rss_before = _status_kb("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    for _ in range(steps):
        step()
    hwm = _status_kb("VmHWM")
    if rss_before is not None and hwm is not None:
        method = "VmHWM after the steps - VmRSS before them" + (
            " (peak reset via /proc/self/clear_refs)"
            if reset
            else " (no peak reset: a set-up peak above the step peak hides the latter)"
        )
        base_kb, peak_kb = rss_before, hwm
    else:  # not Linux. NB ru_maxrss is inherited from the parent across fork+exec on Linux
        method = "ru_maxrss after - before (misses peaks below earlier ones)"
        base_kb = maxrss_before
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": method,
        "malloc_trim": trimmed,
        "steps": steps,
        "baseline_mb": base_kb / 1024,
        "peak_mb": peak_kb / 1024,
        "delta_mb": max(0, peak_kb - base_kb) / 1024,
    }


def retain_freed_memory() -> str:
    """Make glibc's malloc keep freed memory (see "Allocator" above); says what was done."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "left alone: the C library is not glibc"
    configured = any(name.startswith("MALLOC_") for name in os.environ)
    if configured or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "left alone: the environment configures glibc's malloc"
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    # mmap threshold first: setting either value stops glibc adapting it, and its fixed 128 KiB
    # start would then map and unmap nearly every tensor
    if mallopt(M_MMAP_THRESHOLD, 32 << 20) != 1 or mallopt(M_TRIM_THRESHOLD, -1) != 1:
        return "glibc refused mallopt (settings may be half applied)"
    return "glibc malloc keeps freed memory: mallopt mmap threshold 32 MiB, trim threshold -1"


def _malloc_trim() -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def run_memory_probe_subprocess(
    model_name: str, variant: str, args: argparse.Namespace
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_memory-probe",
        f"{model_name}:{variant}",
        "--device",
        args.device,
    ]
    if args.quick:
        cmd.append("--quick")
    cmd += ["--malloc", args.malloc]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- reporting ---------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:  # lscpu adds what a VM's bare "AMD EPYC" leaves out (family / model, caches)
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        wanted = ("Model name", "CPU family", "Model", "Thread(s) per core", "L2 cache", "L3 cache")
        info["lscpu"] = {k: fields[k].strip() for k in wanted if k in fields}
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "src"], capture_output=True, text=True
        ).stdout.strip()
        info["git_commit"] = commit
        info["src_dirty"] = bool(dirty)
    except OSError:
        pass
    return info


def fmt_mem(mem: dict[str, Any] | None) -> str:
    if not mem:
        return "-"
    if "error" in mem:
        return "error"
    return f"{mem['delta_mb']:.1f}"


def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f}"


def print_model_table(name: str, res: dict[str, Any]) -> None:
    d, t = res["model"], res["timing"]
    print(
        f"\n== {name}: {d['parameters']:,} params in {d['parameter_tensors']} tensors, "
        f"batch {d['batch_size']}, input {tuple(d['input_shape'])}; {t['rounds']} rounds x "
        f"{t['steps_per_sample']} steps; {t['quiet_fraction']:.0%} of samples quiet; "
        f"statistics over {res['basis']} samples"
    )
    print(
        f"{'variant':<15} {'median ms':>9} {'quiet/all':>9} {'p25-p75 ms':>15} {'min ms':>7} "
        f"{'cpu ms':>7} {'faults':>6} {'x SGD':>6} {'x SGD pair':>10} {'peak mem MB':>11}  "
        "description"
    )
    for v, r in res["variants"].items():
        print(
            f"{v:<15} {r['median_ms']:>9.1f} {r['n_quiet']:>4}/{r['n_all']:<4} "
            f"{r['p25_ms']:>7.1f}-{r['p75_ms']:<7.1f} {r['min_ms']:>7.1f} "
            f"{fmt_ms(r['median_cpu_ms_all']):>7} {r['median_page_faults']:>6.0f} "
            f"{r['ratio_to_sgd']:>6.3f} "
            f"{r['paired_ratio_to_sgd']:>10.3f} "
            f"{fmt_mem(r.get('memory')):>11}  {VARIANTS[v]}"
        )
    der = res["derived"]
    oh, sp = der["optimizer_overhead"], der["sam_specific_overhead"]
    print(
        f"optimizer overhead (sam - fwd_bwd_2x): {oh['ms']:.1f} ms = {oh['pct_of_sam_step']:.1f}% "
        f"of a SAM step (paired over {oh['n']} {oh['basis']} rounds, "
        f"p25-p75 {oh['p25_ms']:.1f}..{oh['p75_ms']:.1f} ms)"
    )
    print(
        f"SAM-specific overhead ((sam - 2x) - (sgd - 1x)): {sp['ms']:.1f} ms "
        f"= {sp['pct_of_sam_step']:.1f}% of a SAM step (over {sp['n']} {sp['basis']} rounds); "
        f"SGD's own step (sgd - 1x): {der['sgd_optimizer_ms']:.1f} ms"
    )
    print(
        f"sam_no_foreach / sam: {der['no_foreach_over_foreach']:.3f}; "
        f"sam_helper - sam: {der['helper_minus_raw_ms']:.1f} ms"
    )
    for fe, b in res.get("breakdown", {}).items():
        print(f"SAM step breakdown, {fe} (median ms of {b['calls']} calls, quiet ones if >= 3):")
        for k, v in b["median_ms"].items():
            print(f"  {k:<34} {v:9.2f}   ({b['quiet_n'][k]} quiet)")
        print(
            f"  optimizer share of the step (first_step + second_step + zero_grad, timed in the "
            f"same step): {b['optimizer_share_pct']:.2f}% (median over "
            f"{len(b['optimizer_share_samples_pct'])} {b['optimizer_share_basis']} steps)"
        )
    if res.get("warning"):
        print("WARNING: " + res["warning"])
    for tg in res["targets"]:
        status = "PASS" if tg["met"] else "FAIL"
        note = "" if tg["conclusive"] else " (contended run: not conclusive)"
        print(f"target {tg['name']}: {tg['value']:.3f} <= {tg['limit']} -> {status}{note}")


def summarise(samples: Samples, memory: dict[str, dict], model_name: str) -> dict[str, Any]:
    sgd_med = samples.headline("sgd")["median"]
    basis = samples.basis
    variants: dict[str, Any] = {}
    for v in samples.ms:
        q = samples.headline(v)
        everything = quantiles(samples.ms[v])
        cpu = [c for c in samples.cpu_ms[v] if c is not None]
        variants[v] = {
            "description": VARIANTS[v],
            "basis": basis,  # "quiet": statistics over quiet samples only; "all": not enough
            "median_ms": q["median"],
            "p25_ms": q["p25"],
            "p75_ms": q["p75"],
            "min_ms": everything["min"],
            "median_all_ms": everything["median"],
            "n_quiet": len(samples.quiet(v)),
            "n_all": len(samples.ms[v]),
            "ratio_to_sgd": q["median"] / sgd_med,
            "paired_ratio_to_sgd": samples.paired(v, "sgd", "/")["median"],
            "samples_ms": samples.ms[v],
            "median_cpu_ms_all": statistics.median(cpu) if cpu else None,
            "samples_cpu_wait_fraction": samples.stall[v],
            "samples_cpu_ms": samples.cpu_ms[v],
            "median_page_faults": statistics.median(samples.faults[v]),
            "samples_page_faults": samples.faults[v],
        }
        if v in memory:
            variants[v]["memory"] = memory[v]
    sam_med = variants["sam"]["median_ms"]
    oh = samples.paired("sam", "fwd_bwd_2x", "-")
    idx, four_basis = samples.rounds(["sam", "fwd_bwd_2x", "sgd", "fwd_bwd_1x"])
    m = samples.ms
    specific = quantiles(
        [(m["sam"][i] - m["fwd_bwd_2x"][i]) - (m["sgd"][i] - m["fwd_bwd_1x"][i]) for i in idx]
    )
    derived = {
        "optimizer_overhead": {
            "definition": "sam - fwd_bwd_2x, paired per round; includes the base SGD step",
            "ms": oh["median"],
            "p25_ms": oh["p25"],
            "p75_ms": oh["p75"],
            "n": oh["n"],
            "basis": oh["basis"],
            "difference_of_medians_ms": sam_med - variants["fwd_bwd_2x"]["median_ms"],
            "pct_of_sam_step": 100 * oh["median"] / sam_med,
        },
        "sam_specific_overhead": {
            "definition": "(sam - fwd_bwd_2x) - (sgd - fwd_bwd_1x), paired per round",
            "ms": specific["median"],
            "p25_ms": specific["p25"],
            "p75_ms": specific["p75"],
            "n": specific["n"],
            "basis": four_basis,
            "pct_of_sam_step": 100 * specific["median"] / sam_med,
        },
        "sgd_optimizer_ms": samples.paired("sgd", "fwd_bwd_1x", "-")["median"],
        "no_foreach_over_foreach": samples.paired("sam_no_foreach", "sam", "/")["median"],
        "helper_minus_raw_ms": samples.paired("sam_helper", "sam", "-")["median"],
    }
    targets = []
    if model_name == "small_cnn":
        targets.append(
            {
                "name": "SAM/SGD (small CNN)",
                "value": variants["sam"]["ratio_to_sgd"],
                "limit": TARGETS["sam_over_sgd_small_cnn"],
            }
        )
    targets.append(
        {
            "name": f"optimizer overhead % of SAM step ({model_name})",
            "value": derived["optimizer_overhead"]["pct_of_sam_step"],
            "limit": TARGETS["optimizer_overhead_pct"],
        }
    )
    targets.append(
        {
            "name": f"ESAM(loss)/SGD ({model_name})",
            "value": variants["esam_loss"]["ratio_to_sgd"],
            "limit": TARGETS["esam_loss_over_sgd"],
        }
    )
    for tg in targets:
        tg["met"] = bool(tg["value"] <= tg["limit"])
        tg["conclusive"] = basis == "quiet"
    n_quiet = sum(v["n_quiet"] for v in variants.values())
    n_all = sum(v["n_all"] for v in variants.values())
    return {
        "variants": variants,
        "derived": derived,
        "targets": targets,
        "basis": basis,
        "quiet_fraction": n_quiet / n_all,
    }


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timing rounds per model (default: small_cnn {TIMING['small_cnn'][0]}, "
        f"mlp_30m {TIMING['mlp_30m'][0]}; --quick {QUICK_TIMING[0]})",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, a tiny MLP")
    p.add_argument("--output", default=str(ROOT / "benchmarks/results/overhead.json"))
    p.add_argument(
        "--models",
        default="many_tensors,small_cnn,mlp_30m,wrn_28_10",
        help="comma-separated subset of many_tensors,small_cnn,mlp_30m,wrn_28_10",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timing per model after which no new round starts once --repeats rounds "
        f"ran (default: small_cnn {BUDGET_S['small_cnn']:.0f}, mlp_30m {BUDGET_S['mlp_30m']:.0f})",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=QUIET_THRESHOLD,
        help="max fraction of a sample's wall time our threads may wait for a CPU (schedstat "
        "run_delay) for it to count as quiet (default %(default)s)",
    )
    p.add_argument(
        "--malloc",
        choices=("tuned", "default"),
        default="tuned",
        help="tuned (default): glibc's malloc keeps freed memory (mallopt); default: glibc's own "
        "settings, under which the bare step loops page-fault their memory back in every step "
        "(slower, and noisier from run to run); see the module docstring",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--no-breakdown", action="store_true", help="skip the SAM phase breakdown")
    p.add_argument("--_memory-probe", dest="memory_probe", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    malloc = (
        retain_freed_memory()
        if args.malloc == "tuned" and device.type == "cpu"
        else f"left alone (--malloc {args.malloc}, device {device.type})"
    )

    if args.memory_probe:
        model_name, variant = args.memory_probe.split(":")
        print(json.dumps(memory_probe(model_name, variant, args.quick, device)))
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    print(f"malloc: {malloc}", flush=True)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "samkit optimizer step-time overhead",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(device), "malloc": malloc},
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "config": {
            "quick": args.quick,
            "lr": LR,
            "momentum": MOMENTUM,
            "rho": RHO,
            "esam_beta": BETA,
            "esam_gamma": GAMMA,
            "batch_size": BATCH_SIZES,
            "api": {
                "sam": "raw SAM.first_step / second_step",
                "sam_helper": "samkit.train.step.SharpnessAwareStep",
                "esam_*": "ESAM.step(closure) with per-sample losses",
            },
            "targets": TARGETS,
        },
        "models": {},
    }
    for model_name in models:
        if model_name == "many_tensors":  # optimizer-only timing against a per-tensor loop
            res = run_many_tensors(args, device)
            result["models"][model_name] = res
            print_many_table(res)
            continue
        template, x, y = build(model_name, args.quick, device)
        repeats, per_sample, round_warmup, warmup = (
            QUICK_TIMING if args.quick else TIMING[model_name]
        )
        if args.repeats:
            repeats = args.repeats
        budget = args.budget or (QUICK_BUDGET_S if args.quick else BUDGET_S[model_name])
        print(
            f"[{model_name}] timing {len(VARIANTS)} variants, >= {repeats} rounds "
            f"(more, up to {budget:.0f} s, until {repeats} quiet samples each) ...",
            flush=True,
        )
        t0 = time.perf_counter()
        steps = {v: make_variant(v, template, x, y)[0] for v in VARIANTS}
        samples = run_timing(
            steps, repeats, per_sample, round_warmup, warmup, budget, args.quiet_threshold, device
        )
        timing_s = time.perf_counter() - t0
        del steps
        memory: dict[str, dict] = {}
        if not args.no_memory:
            print(f"[{model_name}] memory, one subprocess per variant ...", flush=True)
            for v in ("sgd", "sam") if args.quick else VARIANTS:  # --quick: smoke-test the path
                memory[v] = run_memory_probe_subprocess(model_name, v, args)
        res = summarise(samples, memory, model_name)
        res["model"] = describe(template, x)
        if res["basis"] == "all":
            res["warning"] = (
                "too few quiet samples: another process competed for the CPU during most of the "
                "run, so these numbers include scheduler stalls"
                + (
                    " (with several threads, every OpenMP barrier waits for a descheduled thread; "
                    "--threads 1 is far more robust on a shared machine)"
                    if torch.get_num_threads() > 1
                    else ""
                )
            )
        res["timing"] = {
            "rounds": len(samples.ms["sgd"]),
            "quiet_fraction": res.pop("quiet_fraction"),
            "seconds": timing_s,
            "repeats": repeats,
            "budget_s": budget,
            "quiet_threshold": args.quiet_threshold,
            "steps_per_sample": per_sample,
            "round_warmup": round_warmup,
            "warmup": warmup,
        }
        if not args.no_breakdown:
            print(f"[{model_name}] SAM phase breakdown ...", flush=True)
            n = 1 if args.quick else max(5, repeats // 2)
            res["breakdown"] = {
                f"foreach={fe}": sam_breakdown(template, x, y, fe, n, args.quiet_threshold, device)
                for fe in (True, False)
            }
            direct = res["breakdown"]["foreach=True"]
            for tg in res["targets"]:  # the direct measurement decides this target
                if tg["name"].startswith("optimizer overhead"):
                    tg["name"] = f"optimizer-only overhead % of SAM step, in-step ({model_name})"
                    tg["value"] = direct["optimizer_share_pct"]
                    tg["met"] = bool(tg["value"] <= tg["limit"])
                    tg["conclusive"] = direct["optimizer_share_basis"] == "quiet"
        result["models"][model_name] = res
        print_model_table(model_name, res)
    result["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["total_seconds"] = time.perf_counter() - started
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nwrote {out} ({result['total_seconds']:.0f} s; load average at start "
        f"{result['load_average_start']}, end {result['load_average_end']})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
