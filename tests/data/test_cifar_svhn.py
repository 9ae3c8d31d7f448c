"""CIFAR pickles (read with the restricted unpickler) and SVHN .mat files, in their real formats."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from samkit.data.cifar import (
    cifar_class_names,
    find_cifar_dir,
    load_cifar,
    read_cifar_batch,
    safe_load_pickle,
)
from samkit.data.common import DataFormatError, DataNotFoundError, UnsafePickleError

# ---------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_images_and_labels_exact(tmp_path, writers, protocol):
    written = writers.cifar(tmp_path, "cifar10", n_train=3, n_test=4, protocol=protocol)
    x, y = load_cifar("cifar10", "train", tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (15, 3, 32, 32)
    assert y.dtype == torch.int64 and y.tolist() == written["train_labels"].tolist()
    # CHW: x[i, c, h, w] is pixel (h, w) of colour plane c of the image written.
    hwc = written["train_images"]
    for i in (0, 7, 14):
        for c in range(3):
            np.testing.assert_array_equal(x[i, c].numpy(), hwc[i, :, :, c])
    np.testing.assert_array_equal(x.numpy(), hwc.transpose(0, 3, 1, 2))
    xt, yt = load_cifar("cifar10", "test", tmp_path)
    np.testing.assert_array_equal(xt.numpy(), written["test_images"].transpose(0, 3, 1, 2))
    assert yt.tolist() == written["test_labels"].tolist()
    assert cifar_class_names("cifar10", tmp_path)[:2] == ["class_0", "class_1"]


def test_cifar10_batches_concatenate_in_order(tmp_path, writers):
    written = writers.cifar(tmp_path, "cifar10", n_train=2)
    folder = tmp_path / "cifar-10-batches-py"
    x3, _ = read_cifar_batch(folder / "data_batch_3", b"labels", 10)
    x, _ = load_cifar("cifar10", "train", folder)  # the batches folder itself also works
    np.testing.assert_array_equal(x[4:6].numpy(), x3)
    np.testing.assert_array_equal(x3, written["train_images"][4:6].transpose(0, 3, 1, 2))


def test_cifar100_fine_labels(tmp_path, writers):
    written = writers.cifar(tmp_path, "cifar100", n_train=2, n_test=3)
    x, y = load_cifar("cifar100", "train", tmp_path)
    assert x.shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(x.numpy(), written["train_images"].transpose(0, 3, 1, 2))
    assert y.tolist() == written["train_labels"].tolist()
    _, yt = load_cifar("cifar100", "test", tmp_path)
    assert yt.tolist() == written["test_labels"].tolist()
    assert len(cifar_class_names("cifar100", tmp_path)) == 100


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(
        UnsafePickleError, match=r"data_batch_1: refusing to unpickle posix\.system"
    ):
        safe_load_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(eval, protocol=4),  # builtins.eval
        pickle.dumps({b"labels": [os.getcwd]}, protocol=4),  # nested, posix.getcwd
        pickle.dumps(np.array([1, None], dtype=object), protocol=2) + b"",
    ],
)
def test_other_globals_are_refused(tmp_path, payload):
    path = tmp_path / "test_batch"
    path.write_bytes(payload)
    try:
        obj = safe_load_pickle(path)
    except UnsafePickleError as e:
        assert "refusing to unpickle" in str(e) and "test_batch" in str(e)
    else:  # an object array of None holds no global beyond numpy's own: allowed, but inert
        assert isinstance(obj, np.ndarray) and obj.dtype == object


def test_truncated_pickle_names_file(tmp_path, writers):
    writers.cifar(tmp_path, "cifar10", n_train=2)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataFormatError, match=r"data_batch_4: truncated or corrupt pickle"):
        load_cifar("cifar10", "train", tmp_path)


def test_wrong_structure_names_file(tmp_path, writers):
    writers.cifar(tmp_path, "cifar10", n_train=2)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(DataFormatError, match=r"test_batch: b'data' must have shape \[N, 3072\]"):
        load_cifar("cifar10", "test", tmp_path)
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    )
    with pytest.raises(DataFormatError, match=r"test_batch: labels must be in 0\.\.9"):
        load_cifar("cifar10", "test", tmp_path)
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    )
    with pytest.raises(DataFormatError, match="2 images but 1 labels"):
        load_cifar("cifar10", "test", tmp_path)


def test_missing_cifar_names_every_path(tmp_path, empty_search, monkeypatch):
    monkeypatch.setenv("SAMKIT_DATA", str(tmp_path / "store"))
    with pytest.raises(DataNotFoundError) as err:
        find_cifar_dir("cifar10")
    msg = str(err.value)
    assert str(tmp_path / "store" / "cifar10") in msg
    assert str(empty_search / ".cache/samkit/cifar10") in msg
    assert "cifar-10-python.tar.gz" in msg and "data_batch_1" in msg
    assert err.value.searched == [
        tmp_path / "store/cifar10",
        empty_search / ".cache/samkit/cifar10",
    ]


def test_explicit_data_dir_is_not_skipped(tmp_path, writers, empty_search, monkeypatch):
    writers.cifar(empty_search / ".cache/samkit/cifar10", "cifar10", n_train=1)
    assert find_cifar_dir("cifar10") == empty_search / ".cache/samkit/cifar10/cifar-10-batches-py"
    with pytest.raises(DataNotFoundError, match="typo") as err:
        find_cifar_dir("cifar10", tmp_path / "typo")
    assert err.value.searched == [tmp_path / "typo"]


def test_samkit_data_env(tmp_path, writers, empty_search, monkeypatch):
    writers.cifar(tmp_path / "store" / "cifar100", "cifar100", n_train=1)
    monkeypatch.setenv("SAMKIT_DATA", str(tmp_path / "store"))
    x, _ = load_cifar("cifar100", "train")
    assert x.shape == (5, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# SVHN
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def svhn_dir(tmp_path, writers):
    pytest.importorskip("scipy")
    d = tmp_path / "svhn"
    written = {
        "train": writers.svhn(d / "train_32x32.mat", 12, seed=1),
        "extra": writers.svhn(d / "extra_32x32.mat", 15, seed=2, label_dtype=np.float64),
        "test": writers.svhn(d / "test_32x32.mat", 10, seed=3),
    }
    return d, written


def test_svhn_labels_and_images_exact(svhn_dir):
    from samkit.data.svhn import load_svhn, read_svhn_mat

    d, written = svhn_dir
    x, y = read_svhn_mat(d / "train_32x32.mat")
    assert x.shape == (12, 3, 32, 32) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, written["train"]["images"].transpose(0, 3, 1, 2))
    expected = written["train"]["y"].astype(np.int64) % 10  # 10 -> 0, 1..9 unchanged
    assert y.tolist() == expected.tolist()
    assert 0 in y.tolist() and 10 not in y.tolist()

    xs, ys = load_svhn("svhn", "train", d)  # train then extra (float labels in extra)
    assert xs.shape == (27, 3, 32, 32)
    np.testing.assert_array_equal(xs[12:].numpy(), written["extra"]["images"].transpose(0, 3, 1, 2))
    assert ys[12:].tolist() == (written["extra"]["y"].astype(np.int64) % 10).tolist()
    xc, _ = load_svhn("svhn_core", "train", d)
    assert xc.shape == (12, 3, 32, 32)
    xt, yt = load_svhn("svhn", "test", d)
    assert xt.shape == (10, 3, 32, 32) and yt.dtype == torch.int64


def test_svhn_core_needs_no_extra(svhn_dir, tmp_path):
    from samkit.data.svhn import find_svhn_dir

    d, _ = svhn_dir
    (d / "extra_32x32.mat").unlink()
    assert find_svhn_dir("svhn_core", d) == d
    with pytest.raises(DataNotFoundError, match="extra_32x32.mat"):
        find_svhn_dir("svhn", d)


def test_svhn_truncated_names_file(svhn_dir):
    from samkit.data.svhn import read_svhn_mat

    d, _ = svhn_dir
    path = d / "test_32x32.mat"
    path.write_bytes(path.read_bytes()[:20000])
    with pytest.raises(DataFormatError, match=r"test_32x32\.mat: truncated or corrupt"):
        read_svhn_mat(path)
    path.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DataFormatError, match=r"test_32x32\.mat"):
        read_svhn_mat(path)


def test_svhn_bad_labels_and_layout(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    from samkit.data.svhn import read_svhn_mat

    path = tmp_path / "train_32x32.mat"
    scipy_io.savemat(str(path), {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": [[0], [3]]})
    with pytest.raises(DataFormatError, match=r"labels must be integers in 1\.\.10"):
        read_svhn_mat(path)
    scipy_io.savemat(str(path), {"X": np.zeros((2, 3, 32, 32), np.uint8), "y": [[1], [3]]})
    with pytest.raises(DataFormatError, match=r"X must be uint8 \[32, 32, 3, N\]"):
        read_svhn_mat(path)


def test_missing_svhn_names_paths(tmp_path, empty_search):
    pytest.importorskip("scipy")
    from samkit.data.svhn import load_svhn

    with pytest.raises(DataNotFoundError) as err:
        load_svhn("svhn")
    assert str(empty_search / ".cache/samkit/svhn") in str(err.value)
    assert "train_32x32.mat" in str(err.value) and "extra_32x32.mat" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Optional downloads (torchvision's fetchers, replaced here: the tests never use the network)
# ---------------------------------------------------------------------------------------------


def test_download_cifar_uses_torchvision_fetcher(tmp_path, writers, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    from samkit.data.cifar import download_cifar

    calls = []

    def fake_fetch(url, root, filename, md5):
        calls.append((url, filename, md5))
        writers.cifar(tmp_path / "dl", "cifar100", n_train=1)  # what extraction leaves

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_fetch)
    folder = download_cifar("cifar100", tmp_path / "dl")
    assert folder == tmp_path / "dl" / "cifar-100-python"
    assert calls and calls[0][1] == "cifar-100-python.tar.gz" and len(calls[0][2]) == 32
    assert load_cifar("cifar100", "train", tmp_path / "dl")[0].shape == (5, 3, 32, 32)
    download_cifar("cifar100", tmp_path / "dl")  # present: nothing fetched
    assert len(calls) == 1


def test_download_svhn_uses_torchvision_fetcher(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    from samkit.data.svhn import download_svhn

    fetched = []
    monkeypatch.setattr(tv_utils, "check_integrity", lambda path, md5: False)
    monkeypatch.setattr(
        tv_utils, "download_url", lambda url, root, filename, md5: fetched.append(filename)
    )
    assert download_svhn("svhn_core", tmp_path) == tmp_path
    assert sorted(fetched) == ["test_32x32.mat", "train_32x32.mat"]
