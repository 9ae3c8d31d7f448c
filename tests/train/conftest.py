"""Tiny data sets for the ``samkit train`` tests, written once per session in the real formats."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from data_formats import write_cifar, write_fashion_mnist, write_image_folder, write_svhn_mat


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> SimpleNamespace:
    """One directory per data set (pass it as --data-dir) and the arrays written."""
    root = tmp_path_factory.mktemp("data")
    fm = write_fashion_mnist(root / "fashion_mnist", n_train=128, n_test=64, seed=1)
    c10 = write_cifar(root / "cifar10", "cifar10", n_train=8, n_test=16, seed=2)
    c100 = write_cifar(root / "cifar100", "cifar100", n_train=8, n_test=16, seed=3)
    write_svhn_mat(root / "svhn" / "train_32x32.mat", 24, seed=4)
    write_svhn_mat(root / "svhn" / "extra_32x32.mat", 16, seed=5)
    write_svhn_mat(root / "svhn" / "test_32x32.mat", 16, seed=6)
    layout = {"train": {"cat": 6, "dog": 6, "eel": 6}, "val": {"cat": 2, "dog": 2, "eel": 2}}
    write_image_folder(root / "image_folder", layout, seed=7)
    write_image_folder(root / "imagenet", layout, seed=8)
    return SimpleNamespace(
        root=root,
        dirs={
            name: root / name
            for name in ("fashion_mnist", "cifar10", "cifar100", "svhn", "image_folder")
        }
        | {"imagenet": root / "imagenet", "svhn_core": root / "svhn"},
        fashion_mnist=fm,
        cifar10=c10,
        cifar100=c100,
    )
