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


def _shards_match_full(ds, batch_size, world, *, batched, seed=4, epoch=2, start=0, **kw):
    """Concatenating the shards of every batch in rank order gives the unsharded batch exactly;
    returns the number of batches compared."""
    full = make_loader(ds, batch_size, train=True, seed=seed, batched=batched, **kw)
    full.set_epoch(epoch, start_batch=start)
    expected = [(x.clone(), y.clone()) for x, y in full]
    shards = []
    for rank in range(world):
        loader = make_loader(
            ds, batch_size, train=True, seed=seed, batched=batched, shard=(rank, world), **kw
        )
        assert len(loader) == len(full)  # counted in global batches
        loader.set_epoch(epoch, start_batch=start)
        shards.append([(x.clone(), y.clone()) for x, y in loader])
    assert all(len(s) == len(expected) for s in shards)
    for k, (fx, fy) in enumerate(expected):
        parts = [s[k] for s in shards]
        assert all(x.shape[0] == batch_size // world for x, _ in parts)
        assert torch.equal(torch.cat([x for x, _ in parts]), fx)
        assert torch.equal(torch.cat([y for _, y in parts]), fy)
    return len(expected)


@pytest.mark.parametrize(
    ("batched", "image_level", "batch_level"),
    [
        (True, "basic", "cutout"),  # batched: crop + flip + cutout drawn for the global batch
        (True, "basic", "none"),
        (False, "basic", "cutout"),  # per-sample transforms
        (False, "autoaugment", "cutout"),
    ],
)
def test_shards_concatenate_to_the_full_batch(batched, image_level, batch_level):
    ds = _dataset(n=42, image_level=image_level, batch_level=batch_level)
    loader = make_loader(ds, 8, train=True, batched=batched, shard=(1, 2))
    assert isinstance(loader, BatchedLoader if batched else SampleLoader)
    assert _shards_match_full(ds, 8, 2, batched=batched) == 5
    assert _shards_match_full(ds, 8, 4, batched=batched, epoch=5) == 5
    assert _shards_match_full(ds, 8, 1, batched=batched) == 5
    # resumed mid-epoch: the shards of batches 3, 4 of epoch 2
    assert _shards_match_full(ds, 8, 2, batched=batched, start=3) == 2


def test_sharded_sample_loader_with_workers_and_fashion_mnist():
    ds = _dataset(n=24, image_level="autoaugment", dataset="fashion_mnist", c=1, size=28)
    assert _shards_match_full(ds, 6, 3, batched=False, workers=2) == 4
    ds = _dataset(n=24, dataset="fashion_mnist", c=1, size=28, batch_level="cutout")
    assert _shards_match_full(ds, 6, 3, batched=True) == 4


@pytest.mark.parametrize("batched", [True, False])
def test_sharded_loader_keeps_epoch_sequence(batched):
    # Successive __iter__ calls on a sharded loader advance the epoch like an unsharded one.
    ds = _dataset(n=32, batch_level="cutout")
    full = make_loader(ds, 8, train=True, seed=1, epoch=0, batched=batched)
    shard = make_loader(ds, 8, train=True, seed=1, epoch=0, batched=batched, shard=(1, 2))
    for _ in range(2):
        fx, fy = _collect(full)
        sx, sy = _collect(shard)
        rows = torch.cat([torch.arange(k * 8 + 4, k * 8 + 8) for k in range(4)])
        assert torch.equal(sx, fx[rows]) and torch.equal(sy, fy[rows])


def test_sharded_loader_loads_only_its_rows():
    class Counting(torch.utils.data.Dataset):
        def __init__(self, ds):
            self.ds, self.fetched = ds, []

        def __len__(self):
            return len(self.ds)

        def get(self, index, *, train):
            self.fetched.append(index)
            return self.ds.get(index, train=train)

    ds = Counting(_dataset(n=32))
    loader = make_loader(ds, 8, train=True, seed=0, shard=(0, 4))
    assert isinstance(loader, SampleLoader)
    x, y = _collect(loader)
    assert x.shape[0] == 8 and sorted(ds.fetched) == sorted(y.tolist())


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize(
    ("shard", "kwargs", "message"),
    [
        ((2, 2), {}, "rank must be in 0..1"),
        ((-1, 2), {}, "rank must be in 0..1"),
        ((0, 0), {}, "world_size must be >= 1"),
        ((0, -2), {}, "world_size must be >= 1"),
        ((0, 3), {}, "not a multiple of world_size 3"),
        ((0, 2, 1), {}, r"shard must be \(rank, world_size\)"),
        (2, {}, r"shard must be \(rank, world_size\)"),
        ((0.0, 2), {}, "two integers"),
        ((0, 2), {"drop_last": False}, "last batch of 2 examples"),
    ],
)
def test_bad_shard_arguments_raise(batched, shard, kwargs, message):
    ds = _dataset(n=42)
    with pytest.raises(ValueError, match=message):
        make_loader(ds, 8, train=True, batched=batched, shard=shard, **kwargs)


def test_batch_augment_rows_equal_slices_of_the_batch():
    from samkit.data.transforms import batch_augment

    aug = batch_augment("cifar10", "basic", "cutout", 8)
    x = _dataset(n=12).images
    whole = aug(x, torch.Generator().manual_seed(7))
    draws = aug.draw(12, 32, 32, torch.Generator().manual_seed(7))
    for rows in (slice(0, 4), slice(4, 12), slice(11, 12)):
        assert torch.equal(aug.apply(x[rows], draws.rows(rows)), whole[rows])
