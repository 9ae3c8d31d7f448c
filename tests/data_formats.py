"""Writers of tiny data sets in the real on-disk formats: Fashion-MNIST's IDX (gzip), CIFAR
pickles, SVHN .mat files and image folders. A plain module, so that conftest files, helpers and
test modules all import the same functions (``from data_formats import write_cifar``)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

IDX_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` encoded as an IDX file: 0, 0, type code, ndim, big-endian dims, data."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    code = IDX_TYPE_CODES[np.dtype(dtype)]
    header = struct.pack(">HBB", 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_fashion_mnist(
    directory: Path, n_train: int = 64, n_test: int = 32, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write the four Fashion-MNIST files with random content; return the arrays written."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    write_idx(directory / "train-images-idx3-ubyte.gz", arrays["train_images"])
    write_idx(directory / "train-labels-idx1-ubyte.gz", arrays["train_labels"])
    write_idx(directory / "t10k-images-idx3-ubyte.gz", arrays["test_images"])
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", arrays["test_labels"])
    return arrays


def cifar_rows(images_hwc: np.ndarray) -> np.ndarray:
    """``[N, 32, 32, 3]`` images -> CIFAR's ``[N, 3072]`` rows: the red plane row by row, then
    green, then blue (built plane by plane, independently of any reshape in the loader)."""
    n = images_hwc.shape[0]
    rows = np.empty((n, 3072), np.uint8)
    for i in range(n):
        rows[i] = np.concatenate([images_hwc[i, :, :, c].reshape(-1) for c in range(3)])
    return rows


def write_cifar(
    root: Path,
    name: str = "cifar10",
    n_train: int = 4,
    n_test: int = 5,
    seed: int = 0,
    protocol: int = 2,
    meta: bool = True,
) -> dict[str, np.ndarray]:
    """Write CIFAR-10 (five training batches of ``n_train``) or CIFAR-100 (one training file of
    ``5 * n_train``) under ``root/<folder>``; return the HWC images and labels written."""
    rng = np.random.default_rng(seed)
    c10 = name == "cifar10"
    folder = root / ("cifar-10-batches-py" if c10 else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    key = b"labels" if c10 else b"fine_labels"
    num_classes = 10 if c10 else 100
    files = [(f"data_batch_{i}", n_train) for i in range(1, 6)] if c10 else [("train", 5 * n_train)]
    files.append(("test_batch" if c10 else "test", n_test))
    out: dict[str, list] = {
        "train_images": [],
        "train_labels": [],
        "test_images": [],
        "test_labels": [],
    }
    for fname, n in files:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n).tolist()
        batch = {
            b"batch_label": fname.encode(),
            key: labels,
            b"data": cifar_rows(images),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        if not c10:
            batch[b"coarse_labels"] = [lbl // 5 for lbl in labels]
        with open(folder / fname, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        split = "test" if fname.startswith("test") else "train"
        out[f"{split}_images"].append(images)
        out[f"{split}_labels"].append(np.asarray(labels, np.int64))
    if meta:
        names = [f"class_{i}".encode() for i in range(num_classes)]
        meta_obj = {b"label_names": names} if c10 else {b"fine_label_names": names}
        with open(folder / ("batches.meta" if c10 else "meta"), "wb") as f:
            pickle.dump(meta_obj, f, protocol=protocol)
    return {k: np.concatenate(v) for k, v in out.items()}


def write_svhn_mat(path: Path, n: int, seed: int = 0, label_dtype=np.uint8) -> dict:
    """One SVHN file: ``X`` uint8 ``[32, 32, 3, n]``, ``y`` ``[n, 1]`` in 1..10 (10 = digit 0).
    Returns the images as ``[n, 32, 32, 3]`` and the labels written (1..10)."""
    import scipy.io

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).astype(label_dtype)  # every label, 10 included
    rng.shuffle(y)
    x = np.ascontiguousarray(images.transpose(1, 2, 3, 0))  # [H, W, C, N]
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"X": x, "y": y.reshape(n, 1)})
    return {"images": images, "y": y}


def write_image_folder(
    root: Path, layout: dict[str, dict[str, int]], seed: int = 0, size=(20, 24)
) -> dict[str, np.ndarray]:
    """PNG files ``root/<split>/<class>/<k>.png`` (``layout[split][class]`` images of RGB
    ``size`` = (H, W)); returns ``{relative path: HWC array}``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = {}
    for split, classes in layout.items():
        for cls, count in classes.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{k}.png")
                written[f"{split}/{cls}/{k}.png"] = arr
    return written
