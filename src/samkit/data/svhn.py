"""SVHN (cropped digits, "format 2") from the original MATLAB files.

On-disk layout, as distributed and as ``torchvision`` downloads it::

    train_32x32.mat   73,257 images
    extra_32x32.mat  531,131 images (easier digits)
    test_32x32.mat    26,032 images

Each is a MATLAB v5 file with ``X``, ``uint8 [32, 32, 3, N]`` (height, width, RGB, image), and
``y``, ``[N, 1]`` with labels 1..10 where **10 stands for the digit 0**; it is mapped to 0 here.

Two data sets are built on these files:

* ``svhn``: train + extra for training (604,388 images), as the seed system does. Held in memory
  that is 1.9 GB, and loading ``extra`` needs about twice its size (2 x 1.6 GB) at its peak.
* ``svhn_core``: train only (73,257 images, 225 MB), for small machines.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets
import torchvision.datasets.utils

from samkit.data.common import DataFormatError, all_files, locate

__all__ = [
    "SVHN_FILES",
    "SVHN_SPLITS",
    "download_svhn",
    "find_svhn_dir",
    "load_svhn",
    "num_images",
    "read_svhn_mat",
]

SVHN_FILES = {"train": "train_32x32.mat", "extra": "extra_32x32.mat", "test": "test_32x32.mat"}

#: The files each data set needs, for its training and test splits.
SVHN_SPLITS = {
    "svhn": {"train": ("train", "extra"), "test": ("test",)},
    "svhn_core": {"train": ("train",), "test": ("test",)},
}


def _loadmat(path: Path) -> dict:
    try:
        import scipy.io  # lazy: only the .mat files need scipy (~0.15 s to import)
    except ImportError as e:  # pragma: no cover - scipy is a dependency
        raise ImportError("reading SVHN's .mat files needs scipy: pip install scipy") from e
    try:
        return scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except OSError as e:
        if not path.is_file():
            raise DataFormatError(f"{path}: cannot read: {e.strerror or e}") from e
        raise DataFormatError(f"{path}: truncated or corrupt MATLAB file ({e})") from e
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError, zlib.error, ...
        raise DataFormatError(
            f"{path}: truncated or corrupt MATLAB file ({type(e).__name__}: {e})"
        ) from e


def read_svhn_mat(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 3, 32, 32]`` (CHW) and labels ``int64 [N]`` in 0..9 of one file."""
    path = Path(path)
    mat = _loadmat(path)
    if "X" not in mat or "y" not in mat:
        raise DataFormatError(f"{path}: expected variables X and y, found {sorted(mat)}")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataFormatError(
            f"{path}: X must be uint8 [32, 32, 3, N], found {x.dtype} {list(x.shape)}"
        )
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != x.shape[3]:
        raise DataFormatError(f"{path}: {x.shape[3]} images but {y.shape[0]} labels")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataFormatError(f"{path}: y must be numeric, found {y.dtype}")
    labels = y.astype(np.int64)
    if not np.array_equal(labels, y) or (labels.size and (labels.min() < 1 or labels.max() > 10)):
        raise DataFormatError(f"{path}: labels must be integers in 1..10 (10 = digit 0)")
    labels[labels == 10] = 0
    # [H, W, C, N] -> [N, C, H, W]; one copy.
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return images, labels


def num_images(path: str | os.PathLike[str]) -> int:
    """The number of images in an SVHN .mat file, read from its header (no data loaded)."""
    import scipy.io  # lazy, as in _loadmat

    try:
        shapes = {name: shape for name, shape, _ in scipy.io.whosmat(str(path))}
    except Exception as e:
        raise DataFormatError(f"{path}: cannot read the MATLAB header ({e})") from e
    if len(shapes.get("X", ())) != 4:
        raise DataFormatError(f"{path}: no 4-D variable X")
    return int(shapes["X"][3])


def find_svhn_dir(name: str = "svhn", data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the .mat files that ``name`` ("svhn" or "svhn_core") needs."""
    if name not in SVHN_SPLITS:
        raise ValueError(f"unknown SVHN variant {name!r}; expected one of {sorted(SVHN_SPLITS)}")
    files = [SVHN_FILES[k] for part in SVHN_SPLITS[name].values() for k in part]

    def accept(directory: Path) -> Path | None:
        for candidate in (directory, directory / "svhn"):
            if all_files(candidate, files):
                return candidate
        return None

    return locate(
        "svhn",
        data_dir,
        accept,
        what=", ".join(files),
        how_to_get=(
            "Download the 'format 2' cropped-digit files (train_32x32.mat, test_32x32.mat and, "
            "for 'svhn', extra_32x32.mat) into --data-dir, or with network access call "
            f"samkit.data.svhn.download_svhn({name!r}) (torchvision.datasets.SVHN). "
            "'svhn_core' needs no extra_32x32.mat."
        ),
    )


def load_svhn(
    name: str = "svhn", split: str = "train", data_dir: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [N, 3, 32, 32]`` and labels ``int64 [N]`` of one split of ``name``.

    The training split of "svhn" is train followed by extra; of "svhn_core" train alone.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    directory = find_svhn_dir(name, data_dir)
    parts = [read_svhn_mat(directory / SVHN_FILES[k]) for k in SVHN_SPLITS[name][split]]
    if len(parts) == 1:
        images, labels = parts[0]
    else:
        n = sum(p[0].shape[0] for p in parts)
        images = np.empty((n, 3, 32, 32), np.uint8)
        lo = 0
        for x, _ in parts:
            images[lo : lo + x.shape[0]] = x
            lo += x.shape[0]
        labels = np.concatenate([p[1] for p in parts])
        del parts
    return torch.from_numpy(images), torch.from_numpy(labels)


def download_svhn(name: str = "svhn", root: str | os.PathLike[str] | None = None) -> Path:
    """Download the files ``name`` needs with torchvision (needs network access) into ``root``
    (default ``~/.cache/samkit/svhn``); MD5-checked; they are read by :func:`load_svhn`."""
    if name not in SVHN_SPLITS:
        raise ValueError(f"unknown SVHN variant {name!r}; expected one of {sorted(SVHN_SPLITS)}")
    root = Path(root if root is not None else Path("~/.cache/samkit/svhn").expanduser())
    root.mkdir(parents=True, exist_ok=True)
    for part in sorted({k for p in SVHN_SPLITS[name].values() for k in p}):
        url, filename, md5 = torchvision.datasets.SVHN.split_list[part]
        if not torchvision.datasets.utils.check_integrity(str(root / filename), md5):
            torchvision.datasets.utils.download_url(url, str(root), filename=filename, md5=md5)
    return root
