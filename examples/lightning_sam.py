"""SAM in PyTorch Lightning: one callback, automatic optimisation.

A small CNN (BatchNorm, dropout) on Fashion-MNIST-shaped random data (28x28 grey images, 10
classes, each a fixed smooth random pattern under noise, so there is something to learn), trained
with ``samkit.optim.SAM`` over SGD for a few steps on the CPU::

    python examples/lightning_sam.py --steps 50
    python examples/lightning_sam.py --steps 50 --accumulate 2 --clip 1.0 --precision bf16-mixed

``Trainer(callbacks=[SAMCallback()])`` is the one line that makes Lightning's automatic
optimisation run SAM as samkit's own loop does (see docs/integrations.md, "PyTorch Lightning").
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from samkit.integrations.lightning import SAMCallback, is_first_pass
from samkit.optim import SAM, unwrap


def make_data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """``n`` noisy images: each class is a fixed smooth random pattern, under noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(10, 1, 7, 7, generator=torch.Generator().manual_seed(1234))
    templates = F.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False)
    labels = torch.randint(0, 10, (n,), generator=gen)
    images = templates[labels] + torch.randn(n, 1, 28, 28, generator=gen)
    return torch.utils.data.TensorDataset(images, labels)


class SmallCNN(pl.LightningModule):
    def __init__(self, lr: float, rho: float, steps: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(4),
            nn.Flatten(),
            nn.Dropout(0.1),
            nn.Linear(8 * 7 * 7, 10),
        )
        self.lr, self.rho, self.steps = lr, rho, steps
        self.first_pass_losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels)
        # SAM runs training_step once per pass; record (or self.log) the first pass's loss only
        if is_first_pass(self):
            self.first_pass_losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = SAM(self.parameters(), torch.optim.SGD, rho=self.rho, lr=self.lr, momentum=0.9)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    parser.add_argument("--clip", type=float, default=None, help="gradient_clip_val (by norm)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.accumulate < 1:
        parser.error("--steps, --batch-size and --accumulate must be >= 1")

    pl.seed_everything(args.seed, verbose=False)
    data = make_data(args.steps * args.accumulate * args.batch_size, args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True)
    model = SmallCNN(args.lr, args.rho, args.steps)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=args.steps,
            callbacks=[SAMCallback()],  # the one line
            accumulate_grad_batches=args.accumulate,
            gradient_clip_val=args.clip,
            precision=args.precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        trainer.fit(model, loader)
    losses = model.first_pass_losses
    k = max(1, min(5, len(losses) // 2))
    result = {
        "steps": trainer.global_step,
        "skipped_steps": unwrap(trainer.optimizers[0]).skipped_steps,
        "first_loss": sum(losses[:k]) / k,
        "last_loss": sum(losses[-k:]) / k,
    }
    print(
        f"{result['steps']} SAM steps ({result['skipped_steps']} skipped): mean first-pass loss "
        f"{result['first_loss']:.3f} over the first {k} batches, {result['last_loss']:.3f} over "
        f"the last {k}"
    )
    return result


if __name__ == "__main__":
    main()
