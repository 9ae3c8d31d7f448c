"""SAM in a plain PyTorch training loop, three ways: the two-call form, the closure form, and
samkit.train.SharpnessAwareStep (BatchNorm, dropout, AMP and gradient accumulation done right).

    python examples/plain_loop_sam.py --steps 50
    python examples/plain_loop_sam.py --form step --amp bf16 --accumulation-steps 2

The whole of it, in the two-call form::

    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for x, y in loader:
        loss_fn(model(x), y).backward()        # first pass, at w
        optimizer.first_step(zero_grad=True)   # w -> w + e,  e = rho g / ||g||
        loss_fn(model(x), y).backward()        # second pass, at w + e
        optimizer.second_step(zero_grad=True)  # back to w; SGD step with grad L(w + e)

Tiny synthetic data (random 1x12x12 images labelled by a fixed random linear "teacher").
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from samkit.optim import SAM
from samkit.train import SharpnessAwareStep


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(0.1), nn.Linear(128, 4),
    )  # fmt: skip


def make_data(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 12, 12, generator=g)
    teacher = torch.randn(144, 4, generator=g)
    return x, (x.flatten(1) @ teacher).argmax(1)


def batches(x: torch.Tensor, y: torch.Tensor, steps: int, size: int = 32):
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        i = torch.randint(0, len(x), (size,), generator=g)
        yield x[i], y[i]


def two_call_form(model, data, steps):
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for x, y in batches(*data, steps):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.second_step(zero_grad=True)
        yield loss.item()


def closure_form(model, data, steps):
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for x, y in batches(*data, steps):

        def closure(x=x, y=y):  # zero the gradients, forward, backward, return the loss
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        yield optimizer.step(closure).item()  # both passes, then the SGD step


def step_helper(model, data, steps, amp="none", accumulation_steps=1):
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    # BatchNorm statistics from the first pass only, the same dropout masks in both passes,
    # AMP (bf16; fp16 with a GradScaler), each micro-batch perturbed on its own
    step = SharpnessAwareStep(
        model, optimizer, nn.CrossEntropyLoss(), amp=amp, accumulation_steps=accumulation_steps
    )
    for x, y in batches(*data, steps * accumulation_steps):
        out = step(x, y)
        if out.took_step is not None:  # None while micro-batches accumulate
            yield out.loss.item()


FORMS = {"two-call": two_call_form, "closure": closure_form, "step": step_helper}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per form")
    p.add_argument("--form", choices=("all", *FORMS), default="all")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="--form step")
    p.add_argument("--accumulation-steps", type=int, default=1, help="--form step")
    args = p.parse_args()
    data = make_data()
    for name, run in FORMS.items():
        if args.form not in ("all", name):
            continue
        model = make_model().train()
        extra = {"amp": args.amp, "accumulation_steps": args.accumulation_steps}
        losses = list(run(model, data, args.steps, **(extra if name == "step" else {})))
        print(f"{name}: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
