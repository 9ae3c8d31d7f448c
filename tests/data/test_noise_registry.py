"""Label noise, bootstrap labels, holdout splits and build_datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import samkit.data
from samkit.data import fashion_mnist
from samkit.data.common import DataNotFoundError, split_holdout
from samkit.data.datasets import DATASET_SPECS
from samkit.data.loader import BatchedLoader, InMemoryDataset, SampleLoader, make_loader
from samkit.data.noise import (
    LABEL_NOISE_FILE,
    LabelNoiseRecord,
    apply_label_noise,
    bootstrap_labels,
    load_label_noise,
    save_label_noise,
)
from samkit.data.registry import DATASETS, build_datasets
from samkit.data.transforms import NORMALIZATION

# ---------------------------------------------------------------------------------------------
# Label noise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37, 0.5, 1.0])
def test_label_noise_exact_count_and_all_differ(fraction):
    labels = torch.arange(1003) % 10
    noisy, flipped = apply_label_noise(labels, fraction, 10, seed=4)
    k = round(fraction * 1003)
    assert flipped.dtype == torch.bool and int(flipped.sum()) == k
    assert bool((noisy[flipped] != labels[flipped]).all())
    assert torch.equal(noisy[~flipped], labels[~flipped])
    assert int((noisy != labels).sum()) == k
    assert noisy.min() >= 0 and noisy.max() <= 9 and noisy.dtype == torch.int64


def test_label_noise_deterministic_per_seed():
    labels = torch.randint(0, 100, (5000,), generator=torch.Generator().manual_seed(0))
    a = apply_label_noise(labels, 0.2, 100, seed=1)
    b = apply_label_noise(labels, 0.2, 100, seed=1)
    c = apply_label_noise(labels, 0.2, 100, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    state = torch.get_rng_state()
    apply_label_noise(labels, 0.2, 100, seed=1)
    assert torch.equal(state, torch.get_rng_state())


def test_label_noise_uniform_over_other_classes():
    n, c = 18000, 10
    labels = torch.zeros(n, dtype=torch.long)  # every flip lands on 1..9
    noisy, _ = apply_label_noise(labels, 1.0, c, seed=0)
    counts = torch.bincount(noisy, minlength=c)
    assert counts[0] == 0
    expected = n / (c - 1)
    assert ((counts[1:] - expected).abs() < 6 * (expected**0.5)).all(), counts.tolist()
    # Balanced labels, 40 % noise: the new labels stay roughly uniform.
    labels = torch.arange(20000) % c
    noisy, _ = apply_label_noise(labels, 0.4, c, seed=3)
    counts = torch.bincount(noisy, minlength=c).float()
    assert ((counts - 2000).abs() < 6 * 2000**0.5).all(), counts.tolist()


def test_label_noise_record_roundtrip(tmp_path):
    labels = torch.arange(200) % 7
    noisy, flipped = apply_label_noise(labels, 0.25, 7, seed=9)
    source = torch.arange(200) * 3
    record = LabelNoiseRecord.from_noise(
        labels, noisy, flipped, fraction=0.25, num_classes=7, seed=9, source_indices=source
    )
    path = save_label_noise(record, tmp_path)
    assert path == tmp_path / LABEL_NOISE_FILE
    payload = json.loads(path.read_text())
    assert payload["format"] == "samkit.label_noise/1" and len(payload["indices"]) == 50
    back = load_label_noise(tmp_path)
    assert back == record
    assert torch.equal(back.mask, flipped)
    assert back.source_indices == (flipped.nonzero().flatten() * 3).tolist()
    assert torch.equal(back.apply(labels), noisy)
    with pytest.raises(ValueError, match="differ from the originals"):
        back.apply(noisy)
    with pytest.raises(ValueError, match="200 examples"):
        back.apply(labels[:10])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a samkit label-noise record"):
        load_label_noise(tmp_path / "other.json")


def test_label_noise_rejects_bad_input():
    with pytest.raises(ValueError, match="fraction"):
        apply_label_noise(torch.zeros(4, dtype=torch.long), 1.5, 10)
    with pytest.raises(ValueError, match="labels must be in"):
        apply_label_noise(torch.tensor([0, 10]), 0.5, 10)


def test_bootstrap_labels():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert bootstrap_labels(logits).tolist() == [1, 0]
    assert bootstrap_labels(torch.tensor([2, 0, 1]), num_classes=3).tolist() == [2, 0, 1]
    assert bootstrap_labels(np.array([1.0, 2.0])).dtype == torch.int64
    with pytest.raises(ValueError, match="out of range"):
        bootstrap_labels(torch.tensor([3]), num_classes=3)
    with pytest.raises(ValueError, match="3 classes, not 4"):
        bootstrap_labels(logits.repeat(1, 1), num_classes=4)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_labels(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="class indices"):
        bootstrap_labels(torch.tensor([0.5]))
    ds = InMemoryDataset(
        torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 0]), dataset="cifar10"
    )
    assert ds.with_labels(bootstrap_labels(logits)).labels.tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------
# Holdout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,fraction", [(50000, 0.1), (101, 0.1), (7, 0.5), (10, 0.0)])
def test_split_holdout(n, fraction):
    train, val = split_holdout(n, fraction, seed=0)
    assert len(val) == round(fraction * n) and len(train) == n - len(val)
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(n))
    assert torch.equal(train, train.sort().values) and train.dtype == torch.int64
    t2, v2 = split_holdout(n, fraction, seed=0)
    assert torch.equal(t2, train) and torch.equal(v2, val)
    if n == 50000:
        assert (len(train), len(val)) == (45000, 5000)
        assert not torch.equal(split_holdout(n, fraction, seed=1)[1], val)
    with pytest.raises(ValueError):
        split_holdout(n, 1.0)


# ---------------------------------------------------------------------------------------------
# build_datasets
# ---------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_known():
    with pytest.raises(
        ValueError, match="unknown data set 'mnist'.*cifar10.*svhn_core.*image_folder"
    ):
        build_datasets("mnist")


def test_info_table():
    assert DATASETS["cifar100"].num_classes == 100 and DATASETS["cifar100"].in_channels == 3
    assert DATASETS["fashion_mnist"].in_channels == 1 and DATASETS["fashion_mnist"].image_size == 28
    assert DATASETS["imagenet"].image_size == 224 and not DATASETS["imagenet"].in_memory
    assert DATASETS["svhn"].mean != DATASETS["svhn_core"].mean  # train+extra vs train stats


def test_per_dataset_facts_come_from_one_table():
    assert list(DATASETS) == list(DATASET_SPECS) == list(NORMALIZATION)
    for name, spec in DATASET_SPECS.items():
        info = DATASETS[name]
        assert spec.name == info.name == name
        facts = ("num_classes", "in_channels", "image_size", "mean", "std", "in_memory")
        assert all(getattr(info, f) == getattr(spec, f) for f in facts), name
        assert info.description == spec.description
        assert NORMALIZATION[name] == (spec.mean, spec.std)
        assert len(spec.mean) == len(spec.std) == spec.in_channels
    fm = DATASET_SPECS["fashion_mnist"]
    assert (fashion_mnist.MEAN, fashion_mnist.STD) == (fm.mean[0], fm.std[0]) == (0.2860, 0.3530)
    assert not DATASET_SPECS["svhn"].flip and DATASET_SPECS["svhn"].autoaugment == "svhn"


def test_fashion_mnist_constants_are_not_package_level():
    for name in ("CLASSES", "MEAN", "STD", "find_data_dir"):
        assert not hasattr(samkit.data, name), name
        assert hasattr(fashion_mnist, name)


def test_build_cifar10(tmp_path, writers):
    written = writers.cifar(tmp_path, "cifar10", n_train=10, n_test=6)
    train, test, info = build_datasets("cifar10", data_dir=tmp_path, batch_level="cutout")
    assert (info.num_classes, info.in_channels, info.train_size, info.eval_size) == (10, 3, 50, 6)
    assert info.classes[0] == "class_0" and train.label_noise is None
    assert train.train and not test.train and train.batch_level == "cutout"
    np.testing.assert_array_equal(test.images.numpy(), written["test_images"].transpose(0, 3, 1, 2))
    assert isinstance(make_loader(train, 8, train=True), BatchedLoader)


def test_build_holdout_subset_and_noise(tmp_path, writers):
    written = writers.cifar(tmp_path, "cifar10", n_train=20, n_test=6)
    train, val, info = build_datasets(
        "cifar10",
        data_dir=tmp_path,
        use_test_set=False,
        seed=3,
        train_subset=60,
        label_noise=0.5,
        image_level="autoaugment",
    )
    assert (len(train), len(val)) == (60, 10) and (info.train_size, info.eval_size) == (60, 10)
    assert not val.train
    clean = torch.from_numpy(written["train_labels"])
    # The evaluation split comes from the training file, disjoint from the training part.
    assert set(val.source_indices.tolist()).isdisjoint(train.source_indices.tolist())
    assert torch.equal(val.labels, clean[val.source_indices])  # never noised
    rec = train.label_noise
    assert rec is not None and len(rec.indices) == 30 and rec.num_examples == 60
    assert torch.equal(clean[torch.tensor(rec.source_indices)], torch.tensor(rec.original_labels))
    assert torch.equal(rec.apply(clean[train.source_indices]), train.labels)
    assert int((train.labels != clean[train.source_indices]).sum()) == 30
    assert isinstance(make_loader(train, 8, train=True), SampleLoader)
    # Same seed, same data.
    train2, val2, _ = build_datasets(
        "cifar10", data_dir=tmp_path, use_test_set=False, seed=3, train_subset=60, label_noise=0.5
    )
    assert torch.equal(train2.labels, train.labels) and torch.equal(val2.images, val.images)


def test_build_svhn_holdout_from_core_train_only(tmp_path, writers):
    pytest.importorskip("scipy")
    d = tmp_path / "svhn"
    writers.svhn(d / "train_32x32.mat", 20, seed=1)
    writers.svhn(d / "extra_32x32.mat", 30, seed=2)
    writers.svhn(d / "test_32x32.mat", 5, seed=3)
    train, val, info = build_datasets("svhn", data_dir=d, use_test_set=False, holdout_fraction=0.1)
    assert (len(train), len(val)) == (48, 2)
    assert all(i < 20 for i in val.source_indices.tolist())
    assert info.in_channels == 3 and train.batch_augment(True).flip is False
    core, test, _ = build_datasets("svhn_core", data_dir=d)
    assert (len(core), len(test)) == (20, 5)


def test_build_fashion_mnist(fmnist_dir):
    train, test, info = build_datasets("fashion_mnist", data_dir=fmnist_dir, label_noise=0.25)
    assert train.images.shape == (64, 1, 28, 28) and train.images.dtype == torch.uint8
    assert (info.in_channels, info.num_classes, len(test)) == (1, 10, 32)
    assert len(train.label_noise.indices) == 16
    x, _ = next(iter(make_loader(train, 16, train=True)))
    assert x.shape == (16, 1, 28, 28)


def test_build_image_folder(tmp_path, writers):
    writers.image_folder(tmp_path, {"train": {"a": 2, "b": 2, "c": 1}, "val": {"b": 1}})
    train, val, info = build_datasets("image_folder", data_dir=tmp_path, image_size=32)
    assert info.num_classes == 3 and info.classes == ("a", "b", "c") and len(val) == 1
    train, val, info = build_datasets(
        "image_folder", data_dir=tmp_path, use_test_set=False, holdout_fraction=0.4, label_noise=0.4
    )
    assert (len(train), len(val)) == (3, 2) and not val.train and train.train
    assert len(train.label_noise.indices) == 1


def test_build_missing_data(tmp_path, empty_search):
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        build_datasets("cifar10", data_dir=tmp_path / "nothing")
    with pytest.raises(ValueError, match="train_subset"):
        build_datasets("cifar10", train_subset=0)
    with pytest.raises(ValueError, match="image_level"):
        build_datasets("cifar10", image_level="bogus")
