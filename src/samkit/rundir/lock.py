"""One writer per run directory: an exclusive lock on ``RUN_DIR/.lock``.

``fcntl.flock`` locks are released by the operating system when their holder dies, so a killed
run never leaves a stale lock; a second ``samkit train`` on the same directory is refused at once
with the PID of the one that holds it. The lock file is the only file a run writes before it
knows the directory is its own, and it is removed when the run ends.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from samkit.rundir.layout import CONFIG_FILE

__all__ = ["LOCK_FILE", "RunDirBusy", "RunDirLock"]

LOCK_FILE = ".lock"


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock (the message names its PID)."""


class RunDirLock:
    """``with RunDirLock(run_dir):`` holds the directory's lock (creating the directory)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []  # directories this lock made, deepest first

    def acquire(self) -> None:
        missing = self.path.parent
        while not missing.exists() and missing != missing.parent:
            self._created.append(missing)
            missing = missing.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirBusy(
                    f"{self.path.parent} is in use by another samkit train (PID {holder}); wait "
                    "for it to finish, or stop it (rerunning the command then resumes)"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Release the lock and remove its file; a run that failed before writing its
        config.json also leaves no directory behind that the lock made."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        if not (self.path.parent / CONFIG_FILE).exists():
            for directory in self._created:
                try:
                    directory.rmdir()  # only if empty
                except OSError:
                    break
        os.close(self._fd)  # closing releases the lock
        self._fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
