"""Crash-safe checkpoints: atomic writes, self-verifying names, never code from the file.

A checkpoint is one ``torch.save`` file named ``ckpt-{step:09d}-{sha256[:16]}.pt``. It is written
to a temporary file, fsynced, then renamed into place (atomic on POSIX), so a crash at any moment
leaves either the old set of checkpoints or the new one, never a half-written file under a real
name. The digest in the name lets ``load_checkpoint`` tell a truncated or bit-flipped file from a
good one (``torch.load`` alone accepts many corrupted files). Loading uses ``weights_only=True``:
a checkpoint from elsewhere cannot run code. The file stays a plain ``torch.load``-able dict.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

FORMAT = "samkit-checkpoint/1"
BAD_SUFFIX = ".bad"
_NAME = re.compile(r"ckpt-(\d{9})-([0-9a-f]{16})\.pt")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or not a samkit checkpoint."""


def save_checkpoint(
    state: dict[str, Any],
    directory: str | os.PathLike,
    step: int,
    keep: int = 2,
    protect: Iterable[Path] = (),
) -> Path:
    """Write ``state`` (plus the format tag) atomically; keep the newest ``keep`` checkpoints and
    those in ``protect`` (e.g. the last one known good), delete the older ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    data = buffer.getvalue()
    path = directory / f"ckpt-{step:09d}-{hashlib.sha256(data).hexdigest()[:16]}.pt"
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: the older checkpoints stay, no half file is left
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    protected = {Path(p).name for p in protect}
    for old in list_checkpoints(directory)[keep:]:
        if old.name not in protected:
            old.unlink(missing_ok=True)
    for stale in directory.glob(".ckpt-*.tmp-*"):  # left by a crash mid-write
        if stale != tmp:
            stale.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint files in ``directory``, newest (highest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and verify one checkpoint; ``CheckpointError`` names the file and what is wrong."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from None
    match = _NAME.fullmatch(path.name)
    if match and hashlib.sha256(data).hexdigest()[:16] != match.group(2):
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint (checksum mismatch)")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or unsafe files
        raise CheckpointError(
            f"{path}: corrupt, truncated or unsafe checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a samkit checkpoint (expected format {FORMAT!r})")
    return state


def load_latest_checkpoint(
    directory: str | os.PathLike, map_location: Any = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, falling back past corrupt ones (with a warning).

    None when the directory holds no checkpoint at all; ``CheckpointError`` when all are bad.
    """
    paths = list_checkpoints(directory)
    errors = []
    for path in paths:
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as exc:
            errors.append(str(exc))
            warnings.warn(f"skipping unusable checkpoint: {exc}", RuntimeWarning, stacklevel=2)
    if errors:
        raise CheckpointError("no usable checkpoint:\n  " + "\n  ".join(errors))
    return None


def set_aside(path: str | os.PathLike) -> Path:
    """Rename an unusable checkpoint to ``<name>.bad``: kept for inspection, but no longer listed,
    loaded or counted when older checkpoints are rotated out."""
    path = Path(path)
    target = path.with_name(path.name + BAD_SUFFIX)
    os.replace(path, target)
    _fsync_dir(path.parent)
    return target


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
