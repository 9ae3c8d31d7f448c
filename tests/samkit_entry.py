"""``samkit`` for the tests' subprocesses: the command line plus test hooks and one more model.

    python tests/samkit_entry.py [--step-delay S] [--eval-delay S] [--fail-at RANK:STEP] COMMAND ...
    torchrun ... tests/samkit_entry.py [hook options] train ...

The hook options come before the command and become a :class:`samkit.train.hooks.TrainHooks`:
sleep S seconds after every step (a test can then kill a run mid-epoch), print
``test hook: evaluating`` (rank 0) and sleep before every evaluation (a test can signal a run
while it evaluates), or raise in torchrun rank RANK before its step STEP. The model ``nobn_cnn``
has no BatchNorm: every forward is then independent of how the batch is split, so DDP with
synchronised perturbations can equal single-process SAM on the global batch exactly.
"""

from __future__ import annotations

import os
import sys
import time

from torch import nn

from samkit.cli import main
from samkit.models import register_model
from samkit.train.hooks import TrainHooks


@register_model
def nobn_cnn(num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def hooks_from(argv: list[str]) -> tuple[TrainHooks, list[str]]:
    """The hooks asked for by the leading options of ``argv``, and the rest of it."""
    options: dict[str, str] = {}
    while argv and argv[0] in ("--step-delay", "--eval-delay", "--fail-at"):
        options[argv[0]] = argv[1]
        argv = argv[2:]
    rank = os.environ.get("RANK", "0")

    after_step = before_eval = before_step = None
    if "--step-delay" in options:
        delay = float(options["--step-delay"])
        after_step = lambda step: time.sleep(delay)  # noqa: E731
    if "--eval-delay" in options:
        eval_delay = float(options["--eval-delay"])

        def before_eval() -> None:
            if rank == "0":
                print(f"test hook: evaluating in {eval_delay:g} s", flush=True)
            time.sleep(eval_delay)

    if "--fail-at" in options:
        fail_rank, fail_step = options["--fail-at"].split(":")

        def before_step(step: int) -> None:
            if rank == fail_rank and step == int(fail_step):
                raise RuntimeError(f"test hook: injected failure at step {step}")

    return TrainHooks(before_step, after_step, before_eval), argv


if __name__ == "__main__":
    hooks, argv = hooks_from(sys.argv[1:])
    sys.exit(main(argv, train_hooks=hooks))
