"""Fashion-MNIST IDX parsing, data location, and the data set as build_datasets serves it."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from samkit.data import (
    DataFormatError,
    DataNotFoundError,
    IDXFormatError,
    build_datasets,
    load_fashion_mnist,
    make_loader,
    read_idx,
)
from samkit.data.fashion_mnist import MEAN, STD, find_data_dir

# ---------------------------------------------------------------------------------------------
# read_idx
# ---------------------------------------------------------------------------------------------


def test_read_idx_hand_built_header(tmp_path):
    # 0x00000803: unsigned bytes, 3 dimensions; then 2 x 2 x 3 and 12 data bytes.
    raw = bytes.fromhex("00000803000000020000000200000003") + bytes(range(12))
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(raw)
    arr = read_idx(path)
    assert arr.dtype == np.uint8
    assert arr.shape == (2, 2, 3)
    assert arr.tolist() == np.arange(12).reshape(2, 2, 3).tolist()


def test_read_idx_gzip_roundtrip_is_exact(tmp_path, idx):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = idx.write(tmp_path / "train-images-idx3-ubyte.gz", images)
    with gzip.open(path, "rb") as f:
        assert f.read(4) == b"\x00\x00\x08\x03"  # the real magic number 2051
    out = read_idx(path, expect_ndim=3, expect_dtype=np.uint8)
    assert out.shape == (5, 28, 28) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)
    assert out.flags.writeable  # a copy, not a view of the decompressed bytes


def test_read_idx_big_endian_int32(tmp_path, idx):
    values = np.array([[1, -2, 70000], [0, 2**31 - 1, -(2**31)]], dtype=">i4")
    out = read_idx(idx.write(tmp_path / "ints.idx.gz", values))
    assert out.dtype == np.dtype("int32")
    np.testing.assert_array_equal(out, values.astype(np.int32))


def test_read_idx_truncated_gzip_names_file(tmp_path, idx):
    path = idx.write(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((10, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(IDXFormatError, match="train-images-idx3-ubyte.gz.*(corrupt|truncated)"):
        read_idx(path)


def test_read_idx_truncated_payload(tmp_path, idx):
    data = idx.bytes(np.zeros((10, 28, 28), np.uint8))[:-28]
    path = tmp_path / "imgs.gz"
    path.write_bytes(gzip.compress(data))
    with pytest.raises(IDXFormatError, match=r"imgs\.gz: truncated.*7840 data bytes, found 7812"):
        read_idx(path)


def test_read_idx_trailing_bytes(tmp_path, idx):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(idx.bytes(np.zeros(4, np.uint8)) + b"\x00"))
    with pytest.raises(IDXFormatError, match="trailing bytes"):
        read_idx(path)


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00"))
    with pytest.raises(IDXFormatError, match=r"bad\.gz: bad IDX magic number 0x12340801"):
        read_idx(path)


def test_read_idx_unknown_type_code(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(IDXFormatError, match="magic"):
        read_idx(path)


def test_read_idx_short_and_empty_files(tmp_path):
    (tmp_path / "empty.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(IDXFormatError, match="too short"):
        read_idx(tmp_path / "empty.gz")
    (tmp_path / "hdr.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03\x00\x00\x00\x01"))
    with pytest.raises(IDXFormatError, match="truncated IDX header"):
        read_idx(tmp_path / "hdr.gz")


def test_read_idx_not_gzip_with_gz_suffix(tmp_path, idx):
    path = tmp_path / "plain.gz"
    path.write_bytes(idx.bytes(np.zeros(3, np.uint8)))
    with pytest.raises(IDXFormatError, match=r"plain\.gz: not a gzip file"):
        read_idx(path)


def test_read_idx_expectations(tmp_path, idx):
    path = idx.write(tmp_path / "labels.gz", np.zeros((2, 2), np.uint8))
    with pytest.raises(IDXFormatError, match="expected 1 dimensions, header says 2"):
        read_idx(path, expect_ndim=1)
    path = idx.write(tmp_path / "ints.gz", np.zeros(2, ">i4"))
    with pytest.raises(IDXFormatError, match="expected element type uint8"):
        read_idx(path, expect_dtype=np.uint8)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(IDXFormatError, match="cannot read"):
        read_idx(tmp_path / "nope.gz")


# ---------------------------------------------------------------------------------------------
# Locating and loading
# ---------------------------------------------------------------------------------------------


def test_load_fashion_mnist_exact(fmnist_dir, idx):
    arrays = idx.write_fashion_mnist(fmnist_dir, n_train=12, n_test=7, seed=3)
    x, y = load_fashion_mnist("train", fmnist_dir)
    assert x.dtype == torch.uint8 and y.dtype == torch.uint8
    assert x.shape == (12, 28, 28) and y.shape == (12,)
    np.testing.assert_array_equal(x.numpy(), arrays["train_images"])
    np.testing.assert_array_equal(y.numpy(), arrays["train_labels"])
    x, y = load_fashion_mnist("test", fmnist_dir)
    np.testing.assert_array_equal(x.numpy(), arrays["test_images"])
    np.testing.assert_array_equal(y.numpy(), arrays["test_labels"])


def test_load_uncompressed_files(tmp_path, idx):
    images = np.full((3, 28, 28), 7, np.uint8)
    labels = np.array([0, 9, 4], np.uint8)
    for n in ("train", "t10k"):
        idx.write(tmp_path / f"{n}-images-idx3-ubyte", images, compress=False)
        idx.write(tmp_path / f"{n}-labels-idx1-ubyte", labels, compress=False)
    x, y = load_fashion_mnist("test", tmp_path)
    assert x.shape == (3, 28, 28) and y.tolist() == [0, 9, 4]


def test_load_rejects_bad_split(fmnist_dir):
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("valid", fmnist_dir)


def test_load_count_mismatch(fmnist_dir, idx):
    idx.write(fmnist_dir / "t10k-labels-idx1-ubyte.gz", np.zeros(31, np.uint8))
    with pytest.raises(IDXFormatError, match="32 images but .*t10k-labels.* 31 labels"):
        load_fashion_mnist("test", fmnist_dir)


def test_load_label_out_of_range(fmnist_dir, idx):
    idx.write(fmnist_dir / "t10k-labels-idx1-ubyte.gz", np.full(32, 10, np.uint8))
    with pytest.raises(IDXFormatError, match="label 10 out of range"):
        load_fashion_mnist("test", fmnist_dir)


def test_load_wrong_image_size(fmnist_dir, idx):
    idx.write(fmnist_dir / "t10k-images-idx3-ubyte.gz", np.zeros((32, 32, 32), np.uint8))
    with pytest.raises(IDXFormatError, match="expected 28x28 images, found 32x32"):
        load_fashion_mnist("test", fmnist_dir)


def test_load_corrupt_file_names_it(fmnist_dir):
    path = fmnist_dir / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(IDXFormatError, match="train-images-idx3-ubyte.gz"):
        load_fashion_mnist("train", fmnist_dir)


def test_missing_data_names_every_path(no_default_data, tmp_path, monkeypatch):
    env_dir = tmp_path / "from-env"
    monkeypatch.setenv("SAMKIT_DATA", str(env_dir))
    with pytest.raises(DataNotFoundError) as info:
        find_data_dir()
    message = str(info.value)
    searched = [env_dir, env_dir / "fashion_mnist", *no_default_data]
    for path in searched:
        assert str(path) in message
    assert "$SAMKIT_DATA" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message
    assert info.value.searched == searched
    assert "\n" not in message


def test_explicit_data_dir_missing_is_an_error(no_default_data, fmnist_dir, tmp_path, monkeypatch):
    # Even though $SAMKIT_DATA has the data, a wrong --data-dir must not be silently ignored.
    monkeypatch.setenv("SAMKIT_DATA", str(fmnist_dir))
    wrong = tmp_path / "typo"
    with pytest.raises(DataNotFoundError, match="typo") as info:
        find_data_dir(wrong)
    assert info.value.searched == [wrong]


def test_search_order(no_default_data, fmnist_dir, tmp_path, monkeypatch, idx):
    cache, system = no_default_data
    idx.write_fashion_mnist(system)
    assert find_data_dir() == system
    idx.write_fashion_mnist(cache)
    assert find_data_dir() == cache
    monkeypatch.setenv("SAMKIT_DATA", str(fmnist_dir))
    assert find_data_dir() == fmnist_dir
    other = tmp_path / "other"
    idx.write_fashion_mnist(other)
    assert find_data_dir(other) == other


def test_shared_data_roots(no_default_data, tmp_path, monkeypatch, idx):
    # $SAMKIT_DATA and --data-dir may be the root of all data sets: <root>/fashion_mnist.
    root = tmp_path / "datasets"
    idx.write_fashion_mnist(root / "fashion_mnist")
    monkeypatch.setenv("SAMKIT_DATA", str(root))
    assert find_data_dir() == root / "fashion_mnist"
    assert find_data_dir(root) == root / "fashion_mnist"
    monkeypatch.delenv("SAMKIT_DATA")
    x, _ = load_fashion_mnist("test", root)
    assert x.shape == (32, 28, 28)


def test_error_classes():
    assert issubclass(IDXFormatError, DataFormatError) and issubclass(IDXFormatError, ValueError)
    assert issubclass(DataNotFoundError, FileNotFoundError)


def test_incomplete_directory_is_skipped(no_default_data, tmp_path, monkeypatch, idx):
    cache, system = no_default_data
    idx.write_fashion_mnist(system)
    idx.write_fashion_mnist(cache)
    (cache / "t10k-labels-idx1-ubyte.gz").unlink()
    assert find_data_dir() == system
    (system / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError) as info:
        find_data_dir()
    assert f"{cache} (default, lacks t10k-labels-idx1-ubyte.gz)" in str(info.value)
    assert f"{system} (default, lacks train-images-idx3-ubyte.gz)" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Data set, batches and augmentation
# ---------------------------------------------------------------------------------------------


def test_dataset_normalisation_and_subset(fmnist_dir, idx):
    arrays = idx.write_fashion_mnist(fmnist_dir, n_train=20, n_test=5)
    train, test, info = build_datasets(
        "fashion_mnist", data_dir=fmnist_dir, train_subset=8, image_level="none"
    )
    assert (info.num_classes, info.in_channels, info.train_size, info.eval_size) == (10, 1, 8, 5)
    assert train.images.shape == (8, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == arrays["train_labels"][:8].tolist()
    x, y = next(iter(make_loader(train, 8, train=False)))
    expected = (torch.from_numpy(arrays["train_images"][:8]).float() / 255 - MEAN) / STD
    torch.testing.assert_close(x[:, 0], expected)
    assert y.tolist() == arrays["train_labels"][:8].tolist()
    x, y = next(iter(make_loader(test, 100, train=False)))
    assert x.shape == (5, 1, 28, 28) and y.tolist() == arrays["test_labels"].tolist()
