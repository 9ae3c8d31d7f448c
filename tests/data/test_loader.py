"""InMemoryDataset and make_loader: which path, order, determinism per (seed, epoch)."""

from __future__ import annotations

import pytest
import torch

from samkit.data.loader import BatchedLoader, InMemoryDataset, SampleLoader, make_loader
from samkit.data.transforms import NORMALIZATION, normalize_batch


def _dataset(n=40, image_level="basic", batch_level="none", dataset="cifar10", c=3, size=32):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)
    # Labels = index, so that batches show the order.
    return InMemoryDataset(
        images,
        torch.arange(n),
        dataset=dataset,
        train=True,
        image_level=image_level,
        batch_level=batch_level,
    )


def _collect(loader):
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


def test_make_loader_picks_the_path():
    assert isinstance(make_loader(_dataset(), 8, train=True), BatchedLoader)
    assert isinstance(make_loader(_dataset(batch_level="cutout"), 8, train=True), BatchedLoader)
    aa = _dataset(image_level="autoaugment")
    assert isinstance(make_loader(aa, 8, train=True), SampleLoader)
    assert isinstance(make_loader(aa, 8, train=False), BatchedLoader)  # eval: normalise only
    assert isinstance(make_loader(_dataset(), 8, train=True, batched=False), SampleLoader)
    with pytest.raises(ValueError, match="batched=True"):
        make_loader(aa, 8, train=True, batched=True)


@pytest.mark.parametrize("batched", [True, False])
def test_train_epoch_is_a_permutation_and_deterministic(batched):
    ds = _dataset(n=42, batch_level="cutout")
    loader = make_loader(ds, 8, train=True, seed=1, epoch=3, batched=batched)
    assert len(loader) == 5  # 42 // 8, the ragged batch dropped when training
    x1, y1 = _collect(loader)
    assert x1.shape == (40, 3, 32, 32) and x1.dtype == torch.float32 and y1.dtype == torch.int64
    assert len(set(y1.tolist())) == 40 and y1.tolist() != list(range(40))
    x2, y2 = _collect(make_loader(ds, 8, train=True, seed=1, epoch=3, batched=batched))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # The next __iter__ is the next epoch; set_epoch goes back.
    x3, y3 = _collect(loader)
    assert not torch.equal(y3, y1)
    loader.set_epoch(3)
    x4, y4 = _collect(loader)
    assert torch.equal(x4, x1) and torch.equal(y4, y1)
    x5, y5 = _collect(make_loader(ds, 8, train=True, seed=2, epoch=3, batched=batched))
    assert not torch.equal(y5, y1)


@pytest.mark.parametrize("batched", [True, False])
def test_eval_is_ordered_and_unaugmented(batched):
    ds = _dataset(n=21, batch_level="cutout")
    loader = make_loader(ds, 8, train=False, batched=batched)
    assert len(loader) == 3
    x, y = _collect(loader)
    assert y.tolist() == list(range(21))
    mean, std = NORMALIZATION["cifar10"]
    torch.testing.assert_close(x, normalize_batch(ds.images, mean, std))


def test_batched_augmentation_is_crop_flip_of_each_image():
    ds = _dataset(n=16)
    x, y = _collect(make_loader(ds, 16, train=True, seed=0))
    mean, std = NORMALIZATION["cifar10"]
    for img, i in zip(x, y.tolist()):
        padded = torch.nn.functional.pad(
            normalize_batch(ds.images[i : i + 1], mean, std), (4, 4, 4, 4), mode="reflect"
        )[0]
        found = any(
            torch.allclose(img, (padded.flip(-1) if f else padded)[:, dy : dy + 32, dx : dx + 32])
            for f in (False, True)
            for dy in range(9)
            for dx in range(9)
        )
        assert found


def test_sample_path_independent_of_workers_and_leaves_global_rng():
    ds = _dataset(n=12, image_level="autoaugment", batch_level="cutout")
    state = torch.get_rng_state()
    a = _collect(make_loader(ds, 4, train=True, seed=5, epoch=0, workers=0))
    assert torch.equal(torch.get_rng_state(), state)
    b = _collect(make_loader(ds, 4, train=True, seed=5, epoch=0, workers=2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = _collect(make_loader(ds, 4, train=True, seed=5, epoch=1, workers=0))
    assert not torch.equal(a[0], c[0])


def test_fashion_mnist_shaped_and_drop_last():
    ds = _dataset(n=10, dataset="fashion_mnist", c=1, size=28)
    x, _ = _collect(make_loader(ds, 4, train=True, drop_last=False))
    assert x.shape == (10, 1, 28, 28)
    x, _ = _collect(make_loader(ds, 32, train=True))  # fewer than a batch: kept
    assert x.shape == (10, 1, 28, 28)


def test_device_argument_cpu():
    ds = _dataset(n=8)
    x, y = next(iter(make_loader(ds, 4, train=True, device="cpu")))
    assert x.device.type == "cpu" and y.device.type == "cpu"
    x, y = next(iter(make_loader(ds, 4, train=True, device="cpu", batched=False)))
    assert x.device.type == "cpu"


def test_dataset_subset_and_labels():
    ds = _dataset(n=10)
    sub = ds.subset(torch.tensor([7, 2]))
    assert torch.equal(sub.images, ds.images[[7, 2]]) and sub.source_indices.tolist() == [7, 2]
    relabelled = sub.with_labels(torch.tensor([1, 1]))
    assert relabelled.labels.tolist() == [1, 1] and sub.labels.tolist() == [7, 2]
    assert relabelled.images is sub.images
    with pytest.raises(ValueError, match="need 2 labels"):
        sub.with_labels(torch.zeros(3))
    with pytest.raises(ValueError, match="uint8"):
        InMemoryDataset(torch.zeros(2, 3, 32, 32), torch.zeros(2), dataset="cifar10")
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and int(y) == 3


@pytest.mark.parametrize("batched", [True, False])
def test_resume_mid_epoch_yields_the_same_batches(batched):
    ds = _dataset(n=42, batch_level="cutout")
    full = [(x.clone(), y.clone()) for x, y in make_loader(ds, 8, train=True, seed=3, epoch=2)]
    next_epoch = _collect(make_loader(ds, 8, train=True, seed=3, epoch=3, batched=batched))
    loader = make_loader(ds, 8, train=True, seed=3, batched=batched)
    loader.set_epoch(2, start_batch=3)
    rest = list(loader)
    assert len(rest) == 2
    for (x, y), (fx, fy) in zip(rest, full[3:]):
        assert torch.equal(y, fy)
        if batched:  # the per-sample path augments differently from the batched one
            assert torch.equal(x, fx)
    if not batched:
        whole = make_loader(ds, 8, train=True, seed=3, epoch=2, batched=False)
        for (x, _), (fx, _) in zip(rest, list(whole)[3:]):
            assert torch.equal(x, fx)
    # The pass after a resumed one is the next epoch, from its first batch.
    x, y = _collect(loader)
    assert torch.equal(x, next_epoch[0]) and torch.equal(y, next_epoch[1])
    loader.set_epoch(2, start_batch=len(loader))
    assert list(loader) == []
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=-1)
