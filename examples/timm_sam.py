"""SAM in a timm training loop: a timm model, timm's optimizer factory, timm's step with a loss
scaler, as timm's train.py does it (the changes: ``register_with_timm()`` and ``closure=``).

    python examples/timm_sam.py --steps 20                       # CPU, float32
    python examples/timm_sam.py --device cuda --amp fp16         # fp16 with loss scaling

Tiny synthetic data (random 1x28x28 images, 10 classes); nothing is downloaded. Without
samkit.integrations.timm the same optimizer is two lines of timm's public API::

    base = timm.optim.create_optimizer_v2(model, opt="sgd", lr=0.05, weight_decay=5e-4)
    optimizer = samkit.optim.SAM(base.param_groups, base, rho=0.05)
"""

from __future__ import annotations

import argparse
import contextlib

import timm
import timm.optim
import torch
import torch.nn.functional as F

from samkit.integrations.timm import SAMNativeScaler, register_with_timm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default="test_efficientnet", help="any timm.list_models() name")
    p.add_argument("--opt", default="sam", help="sam (= samsgd), samadamw, ...")
    p.add_argument("--lr", type=float, default=0.05, help="0.05 suits sam; try 1e-3 with samadamw")
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    args = p.parse_args()
    torch.manual_seed(0)

    model = timm.create_model(args.model, pretrained=False, num_classes=10, in_chans=1)
    model.to(args.device).train()
    register_with_timm()  # "sam", "samsgd", "samadamw" in timm's factory
    optimizer = timm.optim.create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=5e-4, rho=args.rho
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    device_type = torch.device(args.device).type

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=dtype)

    # timm's NativeScaler, plus SAM's second pass; only fp16 needs the loss scaled
    loss_scaler = SAMNativeScaler(device=device_type, enabled=args.amp == "fp16")

    images = torch.randn(64, 1, 28, 28, device=args.device)
    labels = torch.randint(0, 10, (64,), device=args.device)
    print(
        f"{type(optimizer).__name__} rho={args.rho} over {type(optimizer.base_optimizer).__name__}"
    )
    for step in range(args.steps):
        i = torch.randint(0, 64, (16,))
        x, y = images[i], labels[i]

        def forward(x=x, y=y):  # as timm's train.py's _forward: the loss of this batch
            with autocast():
                return F.cross_entropy(model(x), y)

        loss = forward()
        second = loss_scaler(
            loss, optimizer, clip_grad=5.0, parameters=model.parameters(), closure=forward
        )
        optimizer.zero_grad()
        at_w_e = "skipped (overflow)" if second is None else f"{second.item():.4f}"
        print(f"step {step + 1}: loss {loss.item():.4f}, at w+e {at_w_e}")


if __name__ == "__main__":
    main()
