"""``samkit`` for the fault tests' subprocesses: ``tests/samkit_entry.py`` plus faults injected
into checkpoint writes, and a pause that waits for an event (a file), not for a time.

    python tests/fault_entry.py [--kill-in-save N] [--enospc-in-save N] [--pause-after STEP FILE]
                                [samkit_entry hook options] COMMAND ...

``--kill-in-save N``: SIGKILL this process during its N-th checkpoint write, once the temporary
file is written and fsynced, before it is renamed into place. ``--enospc-in-save N``: the N-th
checkpoint write fails half-way with "No space left on device". ``--pause-after STEP FILE``: after
step STEP, create ``FILE.paused`` and wait until ``FILE`` exists.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import samkit_entry  # noqa: E402  (registers nobn_cnn; parses the hook options)
from samkit.cli import main  # noqa: E402
from samkit.rundir import checkpoint  # noqa: E402
from samkit.train.hooks import TrainHooks  # noqa: E402

FAULTS = ("--kill-in-save", "--enospc-in-save")


class _FaultyFile:
    """A checkpoint's temporary file that fails as told."""

    def __init__(self, f, fault: str):
        self.f, self.fault = f, fault

    def write(self, data: bytes) -> int:
        if self.fault == "--enospc-in-save":
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.f.name))
        return self.f.write(data)

    def __getattr__(self, name: str):
        return getattr(self.f, name)

    def __enter__(self) -> _FaultyFile:
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()
        if self.fault == "--kill-in-save" and exc[0] is None:  # written and fsynced, not renamed
            os.kill(os.getpid(), signal.SIGKILL)


def inject_faults(argv: list[str]) -> tuple[list[str], tuple[int, Path] | None]:
    """Install the faults asked for by the leading options; return the rest and the pause."""
    faults: dict[str, int] = {}
    pause = None
    while argv and argv[0] in (*FAULTS, "--pause-after"):
        if argv[0] == "--pause-after":
            pause, argv = (int(argv[1]), Path(argv[2])), argv[3:]
        else:
            faults[argv[0]], argv = int(argv[1]), argv[2:]
    writes = 0

    def checkpoint_open(path, mode="r", *args, **kwargs):
        nonlocal writes
        f = open(path, mode, *args, **kwargs)  # noqa: SIM115 (returned to a with block)
        if not Path(path).name.startswith(".ckpt-"):
            return f
        writes += 1
        fault = next((name for name, n in faults.items() if n == writes), None)
        return f if fault is None else _FaultyFile(f, fault)

    checkpoint.open = checkpoint_open  # found before the builtin by the module's name lookup
    return argv, pause


def with_pause(hooks: TrainHooks, pause: tuple[int, Path] | None) -> TrainHooks:
    if pause is None:
        return hooks
    step_at, release = pause
    after = hooks.after_step

    def after_step(step: int) -> None:
        if after is not None:
            after(step)
        if step == step_at:
            Path(f"{release}.paused").touch()
            while not release.exists():
                time.sleep(0.01)

    return TrainHooks(hooks.before_step, after_step, hooks.before_eval)


if __name__ == "__main__":
    argv, pause = inject_faults(sys.argv[1:])
    hooks, argv = samkit_entry.hooks_from(argv)
    sys.exit(main(argv, train_hooks=with_pause(hooks, pause)))
