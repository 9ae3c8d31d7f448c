"""Fashion-MNIST from the original IDX gzip files (``build_datasets("fashion_mnist")`` wraps them
in an :class:`~samkit.data.loader.InMemoryDataset`).

The IDX format (LeCun et al.) is a big-endian header followed by raw data::

    bytes 0-1  zero
    byte  2    element type code (0x08 = unsigned byte, ...)
    byte  3    number of dimensions
    then one uint32 per dimension, then the data in C order.

The header is parsed here with :mod:`struct`; everything is validated (magic number,
dimensions, exact payload size) so that a truncated or corrupt file fails loudly with the
file's name instead of producing garbage tensors.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from samkit.data.common import DataFormatError, DataNotFoundError
from samkit.data.datasets import DATASET_SPECS

__all__ = [
    "CLASSES",
    "FILES",
    "MEAN",
    "STD",
    "DEFAULT_SEARCH_DIRS",
    "DataNotFoundError",
    "IDXFormatError",
    "candidate_dirs",
    "find_data_dir",
    "load_fashion_mnist",
    "read_idx",
]

#: The four files, by split and kind, as distributed (gzip compressed).
FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Per-pixel mean and standard deviation of the 60,000 training images, scaled to [0, 1] (from
#: :data:`samkit.data.datasets.DATASET_SPECS`).
MEAN = DATASET_SPECS["fashion_mnist"].mean[0]
STD = DATASET_SPECS["fashion_mnist"].std[0]

#: Search order after ``--data-dir``, ``$SAMKIT_DATA`` and ``$SAMKIT_DATA/fashion_mnist``.
DEFAULT_SEARCH_DIRS = (
    "~/.cache/samkit/fashion_mnist",
    "/usr/share/datasets/fashion-mnist",
)

_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_SPLIT_SIZES = {"train": 60_000, "test": 10_000}
_IMAGE_SHAPE = (28, 28)


class IDXFormatError(DataFormatError):
    """An IDX file is truncated, corrupt or not what was expected."""


# --------------------------------------------------------------------------------------------
# IDX parsing
# --------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    """The decompressed content of ``path`` (gzip if it starts with the gzip magic)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise IDXFormatError(f"{path}: cannot read: {e.strerror or e}") from e
    if raw[:2] != b"\x1f\x8b":
        if path.suffix == ".gz":
            raise IDXFormatError(f"{path}: not a gzip file (bad gzip magic number)")
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise IDXFormatError(f"{path}: corrupt or truncated gzip data ({e})") from e


def read_idx(
    path: str | os.PathLike[str],
    *,
    expect_ndim: int | None = None,
    expect_dtype: np.dtype | str | None = None,
) -> np.ndarray:
    """Read one IDX file (plain or gzip) into a native-endian numpy array.

    Raises :class:`IDXFormatError`, naming the file, when the header is invalid, the number of
    dimensions or element type differ from ``expect_ndim`` / ``expect_dtype``, or the payload is
    not exactly as long as the header announces.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXFormatError(f"{path}: file too short for an IDX header ({len(data)} bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in _IDX_TYPES:
        raise IDXFormatError(
            f"{path}: bad IDX magic number 0x{int.from_bytes(data[:4], 'big'):08x}"
        )
    dtype = _IDX_TYPES[type_code]
    if expect_ndim is not None and ndim != expect_ndim:
        raise IDXFormatError(f"{path}: expected {expect_ndim} dimensions, header says {ndim}")
    if expect_dtype is not None and dtype.newbyteorder("=") != np.dtype(expect_dtype):
        raise IDXFormatError(
            f"{path}: expected element type {np.dtype(expect_dtype)}, header says {dtype}"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IDXFormatError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = math.prod(shape) * dtype.itemsize  # exact: np.prod would wrap around in int64
    actual = len(data) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise IDXFormatError(
            f"{path}: {what}: header shape {tuple(shape)} needs {expected} data bytes, "
            f"found {actual}"
        )
    try:
        arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    except ValueError as e:  # no data, but dimensions past numpy's limit: (0, 2**32-1, 2**32-1)
        raise IDXFormatError(f"{path}: header shape {tuple(shape)} is not an array ({e})") from e
    return arr.astype(dtype.newbyteorder("="), copy=True)


# --------------------------------------------------------------------------------------------
# Locating and loading
# --------------------------------------------------------------------------------------------


def candidate_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[tuple[Path, str]]:
    """The directories searched, in order, each with where it came from.

    ``$SAMKIT_DATA`` is tried itself (as this loader always did) and then as the shared data root
    of all data sets, ``$SAMKIT_DATA/fashion_mnist``, as the other loaders use it.
    """
    out: list[tuple[Path, str]] = []
    if data_dir is not None:
        out.append((Path(data_dir).expanduser(), "--data-dir"))
    env = os.environ.get("SAMKIT_DATA")
    if env:
        out.append((Path(env).expanduser(), "$SAMKIT_DATA"))
        out.append((Path(env).expanduser() / "fashion_mnist", "$SAMKIT_DATA"))
    for d in DEFAULT_SEARCH_DIRS:
        out.append((Path(d).expanduser(), "default"))
    return out


def _file_in(directory: Path, name: str) -> Path | None:
    """``name`` (gzip) or its uncompressed twin inside ``directory``, if either exists."""
    for candidate in (directory / name, directory / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def find_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The first directory holding all four Fashion-MNIST files.

    Order: ``data_dir`` (``--data-dir``; its ``fashion_mnist`` subfolder also counts, so one
    data root can serve every data set), ``$SAMKIT_DATA``, ``$SAMKIT_DATA/fashion_mnist``,
    ``~/.cache/samkit/fashion_mnist``, ``/usr/share/datasets/fashion-mnist``. An explicitly
    given ``data_dir`` that lacks the files is an error even if a later directory has them, so
    that a typo is not silently ignored.
    """
    searched = candidate_dirs(data_dir)
    if data_dir is not None:
        searched = searched[:1]
        sub = searched[0][0] / "fashion_mnist"
        if all(_file_in(sub, name) is not None for name in FILES.values()):
            return sub
    notes = []
    for directory, origin in searched:
        missing = [name for name in FILES.values() if _file_in(directory, name) is None]
        if not missing:
            return directory
        if directory.is_dir():  # say what is missing where the directory itself exists
            origin += ", lacks " + ", ".join(missing)
        notes.append(f"{directory} ({origin})")
    paths = [d for d, _ in searched]
    listed = ", ".join(notes)
    raise DataNotFoundError(
        f"Fashion-MNIST not found; searched: {listed}. Install it with "
        f"`apt-get install dataset-fashion-mnist` or put the four files "
        f"({', '.join(FILES.values())}) in --data-dir.",
        paths,
    )


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [N, 28, 28]`` and labels ``uint8 [N]`` of one split ("train" or "test").

    The real data set has 60,000 / 10,000 images; smaller files in the same format (as the tests
    write) are accepted, but images and labels must agree in count and labels must be in 0..9.
    """
    if split not in _SPLIT_SIZES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    directory = find_data_dir(data_dir)
    img_path = _file_in(directory, FILES[(split, "images")])
    lbl_path = _file_in(directory, FILES[(split, "labels")])
    assert img_path is not None and lbl_path is not None
    images = read_idx(img_path, expect_ndim=3, expect_dtype=np.uint8)
    labels = read_idx(lbl_path, expect_ndim=1, expect_dtype=np.uint8)
    if images.shape[1:] != _IMAGE_SHAPE:
        raise IDXFormatError(
            f"{img_path}: expected 28x28 images, found {images.shape[1]}x{images.shape[2]}"
        )
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(
            f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise IDXFormatError(f"{lbl_path}: label {int(labels.max())} out of range 0..9")
    return torch.from_numpy(images), torch.from_numpy(labels)
