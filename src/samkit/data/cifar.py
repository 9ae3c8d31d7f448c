"""CIFAR-10 and CIFAR-100 from the "python version" pickle batches, read safely.

On-disk layout (as distributed by the authors and as ``torchvision`` downloads it)::

    cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta
    cifar-100-python/train, test, meta

Each batch is a pickled dict (Python 2, so keys are bytes) with ``b"data"``, a ``uint8`` array
``[N, 3072]`` whose rows hold the red, green and blue 32x32 planes one after the other, row-major,
and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100), a list of ints.

Pickle can run arbitrary code, so the files are read with :class:`RestrictedUnpickler`, which
only lets through what numpy needs to rebuild arrays; anything else (``os.system``,
``builtins.eval``, ...) raises :class:`UnsafePickleError` ("refusing to unpickle ...").
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.datasets
import torchvision.datasets.utils

from samkit.data.common import (
    DataFormatError,
    UnsafePickleError,
    all_files,
    check_labels,
    locate,
)

__all__ = [
    "CIFAR_LAYOUT",
    "RestrictedUnpickler",
    "download_cifar",
    "find_cifar_dir",
    "load_cifar",
    "read_cifar_batch",
    "safe_load_pickle",
]

#: Per variant: folder and archive names, batch files, label key, meta file, number of classes.
CIFAR_LAYOUT: dict[str, dict[str, Any]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
        "label_key": b"labels",
        "meta": "batches.meta",
        "names_key": b"label_names",
        "num_classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ("train",),
        "test": ("test",),
        "label_key": b"fine_labels",
        "meta": "meta",
        "names_key": b"fine_label_names",
        "num_classes": 100,
    },
}

_IMAGE_BYTES = 3 * 32 * 32

# Globals a CIFAR pickle may name: numpy's array reconstruction (both the numpy 1.x and 2.x
# module paths), the dtype class, scalars, and protocol-5 buffers; ``_codecs.encode`` is how
# Python 3 pickles ``bytes`` at protocols < 3. None of these can reach the file system or
# run code: they only build arrays, dtypes and byte strings.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only reconstructs numpy arrays and plain containers.

    dicts, lists, tuples, ints, floats, str and bytes need no globals; numpy arrays need the
    few in ``_ALLOWED_GLOBALS``. Any other global raises :class:`UnsafePickleError`.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to unpickle {module}.{name}: CIFAR batches only contain dicts of "
            "bytes, lists and numpy arrays"
        )


def safe_load_pickle(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``encoding="bytes"``, as CIFAR's
    Python 2 pickles need). Errors name the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        return RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except Exception as e:  # truncated / corrupt: EOFError, UnpicklingError, ValueError, ...
        reason = " ".join(str(e).split())  # one line: some pickle errors span two
        raise DataFormatError(
            f"{path}: truncated or corrupt pickle ({type(e).__name__}: {reason})"
        ) from e


def read_cifar_batch(
    path: str | os.PathLike[str], label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 3, 32, 32]`` and labels ``int64 [N]`` of one CIFAR batch file."""
    path = Path(path)
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: expected a dict, found {type(obj).__name__}")
    obj = {k.encode(errors="replace") if isinstance(k, str) else k: v for k, v in obj.items()}
    if b"data" not in obj or label_key not in obj:
        raise DataFormatError(
            f"{path}: missing key(s) {[k for k in (b'data', label_key) if k not in obj]}; "
            f"found {sorted(obj, key=repr)}"  # keys of mixed types do not sort otherwise
        )
    data = obj[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise DataFormatError(f"{path}: b'data' must be a uint8 array")
    if data.ndim != 2 or data.shape[1] != _IMAGE_BYTES:
        raise DataFormatError(
            f"{path}: b'data' must have shape [N, {_IMAGE_BYTES}], found {data.shape}"
        )
    try:
        labels = np.asarray(obj[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: beyond int64
        raise DataFormatError(f"{path}: {label_key!r} is not a list of integers") from e
    if labels.shape[0] != data.shape[0]:
        raise DataFormatError(
            f"{path}: {data.shape[0]} images but {labels.shape[0]} labels in {label_key!r}"
        )
    check_labels(labels, num_classes, path)
    return data.reshape(-1, 3, 32, 32), labels


def _accept(name: str):
    layout = CIFAR_LAYOUT[name]
    files = layout["train"] + layout["test"]

    def accept(directory: Path) -> Path | None:
        for candidate in (directory / layout["folder"], directory):
            if all_files(candidate, files):
                return candidate
        return None

    return accept


def _how_to_get(name: str) -> str:
    layout = CIFAR_LAYOUT[name]
    cls = "CIFAR10" if name == "cifar10" else "CIFAR100"
    return (
        f"Put the python-version archive's folder {layout['folder']}/ "
        f"({', '.join(layout['train'] + layout['test'])}) in one of them, e.g. extract "
        f"{layout['archive']} into --data-dir, or with network access call "
        f"samkit.data.cifar.download_cifar({name!r}) (torchvision.datasets.{cls})."
    )


def find_cifar_dir(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the batch files of ``name`` ("cifar10" or "cifar100")."""
    if name not in CIFAR_LAYOUT:
        raise ValueError(f"unknown CIFAR variant {name!r}; expected one of {sorted(CIFAR_LAYOUT)}")
    layout = CIFAR_LAYOUT[name]
    return locate(
        name,
        data_dir,
        _accept(name),
        what=f"{layout['folder']}/ with {', '.join(layout['train'] + layout['test'])}",
        how_to_get=_how_to_get(name),
    )


def load_cifar(
    name: str, split: str = "train", data_dir: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [N, 3, 32, 32]`` (CHW, RGB) and labels ``int64 [N]`` of one split.

    ``split`` is "train" (the five batches of CIFAR-10 concatenated in order) or "test".
    Smaller files in the real format are accepted (the tests write such).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    layout = CIFAR_LAYOUT.get(name)
    directory = find_cifar_dir(name, data_dir)
    assert layout is not None
    images, labels = [], []
    for fname in layout[split]:
        x, y = read_cifar_batch(directory / fname, layout["label_key"], layout["num_classes"])
        images.append(x)
        labels.append(y)
    return (
        torch.from_numpy(np.ascontiguousarray(np.concatenate(images))),
        torch.from_numpy(np.concatenate(labels)),
    )


def cifar_class_names(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Class names from the meta file if present, else ``["0", "1", ...]``."""
    layout = CIFAR_LAYOUT[name]
    meta = find_cifar_dir(name, data_dir) / layout["meta"]
    if meta.is_file():
        obj = safe_load_pickle(meta)
        if isinstance(obj, dict) and layout["names_key"] in obj:
            names = obj[layout["names_key"]]
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return [str(i) for i in range(layout["num_classes"])]


def download_cifar(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Download ``name`` with torchvision (needs network access) into ``root`` (default
    ``~/.cache/samkit/<name>``) and return the folder; the files are then read by
    :func:`load_cifar` with the restricted unpickler, never by torchvision's reader."""
    if name not in CIFAR_LAYOUT:
        raise ValueError(f"unknown CIFAR variant {name!r}; expected one of {sorted(CIFAR_LAYOUT)}")
    root = Path(root if root is not None else Path("~/.cache/samkit").expanduser() / name)
    root.mkdir(parents=True, exist_ok=True)

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = root / CIFAR_LAYOUT[name]["folder"]
    if not _accept(name)(folder):
        # Fetch, check the MD5 and extract only; the files are never read by torchvision.
        torchvision.datasets.utils.download_and_extract_archive(
            cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5
        )
    return folder
