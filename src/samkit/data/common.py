"""Shared pieces of the data loaders: errors, the data-directory search, seeds, holdout splits.

Every data set is looked for, in order, in

1. the directory given explicitly (``--data-dir``); if it is given but lacks the files, that is an
   error even when a later directory has them, so that a typo is never silently ignored;
2. ``$SAMKIT_DATA/<name>``;
3. ``~/.cache/samkit/<name>``.

Each loader says which files make a directory acceptable (for CIFAR-10 the directory may hold
``cifar-10-batches-py/`` or be that folder itself, as torchvision's ``root`` does).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DataFormatError",
    "DataNotFoundError",
    "UnsafePickleError",
    "derive_seed",
    "generator",
    "locate",
    "search_dirs",
    "split_holdout",
]


class DataFormatError(ValueError):
    """A data file is truncated, corrupt or not what was expected (the message names it)."""


class DataNotFoundError(FileNotFoundError):
    """The data set was not found in any of the searched directories (``searched`` lists them,
    the message names them and says how to get the data)."""

    def __init__(self, message: str, searched: Sequence[Path]):
        super().__init__(message)
        self.searched = list(searched)


class UnsafePickleError(DataFormatError):
    """A pickle asked for a global that the restricted unpickler does not allow."""


def search_dirs(
    name: str, data_dir: str | os.PathLike[str] | None = None
) -> list[tuple[Path, str]]:
    """The directories searched for data set ``name``, in order, each with where it came from."""
    out: list[tuple[Path, str]] = []
    if data_dir is not None:
        out.append((Path(data_dir).expanduser(), "--data-dir"))
    env = os.environ.get("SAMKIT_DATA")
    if env:
        out.append((Path(env).expanduser() / name, "$SAMKIT_DATA"))
    out.append((Path("~/.cache/samkit").expanduser() / name, "default"))
    return out


def locate(
    name: str,
    data_dir: str | os.PathLike[str] | None,
    accept: Callable[[Path], Path | None],
    *,
    what: str,
    how_to_get: str,
) -> Path:
    """The first searched directory that ``accept`` takes (it returns the data's own folder).

    Raises :class:`DataNotFoundError` naming every directory searched, what was looked for
    (``what``) and how to get the data (``how_to_get``).
    """
    searched = search_dirs(name, data_dir)
    tried: list[tuple[Path, str]] = []
    for directory, origin in searched:
        tried.append((directory, origin))
        found = accept(directory)
        if found is not None:
            return found
        if origin == "--data-dir":
            break
    listed = ", ".join(f"{d} ({o})" for d, o in tried)
    raise DataNotFoundError(
        f"{name}: data not found; looked for {what} in: {listed}. {how_to_get}",
        [d for d, _ in tried],
    )


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative integers (e.g. run seed, epoch, stream number).

    Unlike ``seed + epoch`` nearby inputs give unrelated seeds: ``(0, 1)`` and ``(1, 0)`` differ.
    """
    if any(int(p) < 0 for p in parts):
        raise ValueError(f"seeds must be non-negative, got {parts}")
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def generator(*parts: int) -> torch.Generator:
    """A CPU :class:`torch.Generator` seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def split_holdout(
    n: int, fraction: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic train / validation indices (both sorted, int64) of ``n`` examples.

    The validation part has exactly ``round(fraction * n)`` examples, drawn without replacement
    by a permutation seeded with ``seed``; the two parts are disjoint and cover ``range(n)``.
    For CIFAR (50,000 images) the default gives the seed system's 45,000 / 5,000.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), not {fraction}")
    k = round(fraction * n)
    perm = torch.randperm(n, generator=generator(seed, 0x401D))
    val = perm[:k].sort().values
    train = perm[k:].sort().values
    return train, val


def check_labels(labels: np.ndarray, num_classes: int, path: Path | str) -> None:
    """Raise :class:`DataFormatError` naming ``path`` if a label is outside ``0..num_classes-1``."""
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataFormatError(
            f"{path}: labels must be in 0..{num_classes - 1}, found "
            f"{int(labels.min())}..{int(labels.max())}"
        )


def all_files(directory: Path, names: Sequence[str]) -> bool:
    return all((directory / n).is_file() for n in names)
