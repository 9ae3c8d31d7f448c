"""``samkit`` for the tests' subprocesses: the command line plus test hooks and one more model.

    python tests/samkit_entry.py [HOOK OPTIONS] COMMAND ...
    torchrun ... tests/samkit_entry.py [HOOK OPTIONS] train ...

The hook options come before the command and become a :class:`samkit.train.hooks.TrainHooks`.
Events, for tests that must stop a run at a known point (deterministic on any machine):

``--signal-at STEP:SIGNAL[:parent]``
    rank 0 sends SIGNAL (``SIGINT``, ``SIGTERM``, ``SIGKILL``) to itself (or to its parent, i.e.
    torchrun, which forwards it to every worker) right after step STEP, and waits until the run's
    handler has received it: the run stops at a known step.
``--signal-in-eval SIGNAL[:parent]``
    the same before the first evaluation (the signal arrives while the run evaluates).
``--pause-at STEP:FILE``
    rank 0 creates FILE right after step STEP and waits there until it receives a stop signal (or
    is killed): the test waits for FILE, then signals or kills the job, which is at step STEP. A
    run that finds FILE there already goes on: of several runs (a sweep's cells) one pauses.
``--fail-at RANK:STEP``
    raise in torchrun rank RANK before its step STEP.

Delays, for tests that only need a run to take a while (no assertion depends on them):
``--step-delay S`` sleeps S seconds after every step, ``--eval-delay S`` prints
``test hook: evaluating`` (rank 0) and sleeps before every evaluation.

The model ``nobn_cnn`` has no BatchNorm: every forward is then independent of how the batch is
split, so DDP with synchronised perturbations can equal single-process SAM on the global batch
exactly.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

from torch import nn

from samkit.cli import main
from samkit.models import register_model
from samkit.train.hooks import TrainHooks

OPTIONS = ("--step-delay", "--eval-delay", "--fail-at", "--signal-at", "--signal-in-eval")
OPTIONS += ("--pause-at",)


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


def stop_signal_received() -> bool:
    """Whether the training loop's SIGINT / SIGTERM handler (``samkit.train.signals``) has
    recorded a signal in this process."""
    owner = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return getattr(owner, "signum", None) is not None


def wait_for_stop_signal() -> None:
    while not stop_signal_received():
        time.sleep(0.01)


def send(spec: str) -> Callable[[], None]:
    """``SIGNAL[:parent]`` -> a function that sends it and waits until it has arrived."""
    name, _, target = spec.partition(":")
    signum = signal.Signals[name]
    if target not in ("", "parent"):
        raise SystemExit(f"samkit_entry: signal target must be 'parent' or nothing, not {target!r}")

    def fire() -> None:
        os.kill(os.getppid() if target == "parent" else os.getpid(), signum)
        wait_for_stop_signal()  # (SIGKILL to this process never returns)

    return fire


def hooks_from(argv: list[str]) -> tuple[TrainHooks, list[str]]:
    """The hooks asked for by the leading options of ``argv``, and the rest of it."""
    options: dict[str, str] = {}
    while argv and argv[0] in OPTIONS:
        options[argv[0]] = argv[1]
        argv = argv[2:]
    rank = os.environ.get("RANK", "0")
    after: list[Callable[[int], None]] = []
    before_eval: list[Callable[[], None]] = []
    before_step = None

    if "--step-delay" in options:
        delay = float(options["--step-delay"])
        after.append(lambda step: time.sleep(delay))
    if "--signal-at" in options and rank == "0":
        at, _, spec = options["--signal-at"].partition(":")
        fire = send(spec)
        after.append(lambda step: fire() if step == int(at) else None)
    if "--pause-at" in options and rank == "0":
        at, _, marker = options["--pause-at"].partition(":")

        def pause(step: int) -> None:
            if step != int(at):
                return
            try:  # the first run to get here pauses
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return
            os.write(fd, f"{os.getpid()} paused after step {step}\n".encode())
            os.close(fd)
            wait_for_stop_signal()

        after.append(pause)
    if "--eval-delay" in options:
        eval_delay = float(options["--eval-delay"])

        def delay_eval() -> None:
            if rank == "0":
                print(f"test hook: evaluating in {eval_delay:g} s", flush=True)
            time.sleep(eval_delay)

        before_eval.append(delay_eval)
    if "--signal-in-eval" in options and rank == "0":
        fire_in_eval = send(options["--signal-in-eval"])
        fired: list[bool] = []

        def signal_in_eval() -> None:
            if not fired:
                fired.append(True)
                fire_in_eval()

        before_eval.append(signal_in_eval)
    if "--fail-at" in options:
        fail_rank, fail_step = options["--fail-at"].split(":")

        def before_step(step: int) -> None:
            if rank == fail_rank and step == int(fail_step):
                raise RuntimeError(f"test hook: injected failure at step {step}")

    def after_step(step: int) -> None:
        for hook in after:
            hook(step)

    def evaluating() -> None:
        for hook in before_eval:
            hook()

    return TrainHooks(
        before_step,
        after_step if after else None,
        evaluating if before_eval else None,
    ), argv


if __name__ == "__main__":
    hooks, argv = hooks_from(sys.argv[1:])
    sys.exit(main(argv, train_hooks=hooks))
