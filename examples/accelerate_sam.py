"""SAM with Hugging Face Accelerate: a small MLP on random data, with gradient accumulation.

The one change from a plain Accelerate loop is ``accelerator.backward(loss)`` ->
``sam_backward(accelerator, model, optimizer, compute_loss, x, y)``; Accelerate's
``optimizer.step()`` then makes SAM's base step.

    python examples/accelerate_sam.py --steps 20 [--mixed-precision bf16]
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn import functional as F

from samkit.integrations.accelerate import sam_backward
from samkit.optim import SAM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM's radius (default 0.05)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    args = parser.parse_args()

    accumulation = 2  # each micro-batch gets its own perturbation; SAM gradients are summed
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=accumulation
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 2))
    x = torch.randn(16 * accumulation * args.steps, 20)
    y = (x[:, 0] > 0).long()  # something to learn
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=args.rho, lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=args.steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    def compute_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(inputs), targets)  # forward only: called once per pass

    steps, losses = 0, []
    for inputs, targets in loader:
        with accelerator.accumulate(model):
            losses.append(
                sam_backward(accelerator, model, optimizer, compute_loss, inputs, targets)
            )
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)  # the SAM gradient
                steps += 1
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    first, last = losses[0].item(), torch.stack(losses[-accumulation:]).mean().item()
    print(f"SAM steps: {steps}, loss {first:.4f} -> {last:.4f}")


if __name__ == "__main__":
    main()
