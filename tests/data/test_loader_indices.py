"""``make_loader(..., indices=True)`` (SAF's sample indices): the same batches as without it, bit
for bit, plus each row's position in the data set, on both paths, sharded, evaluated and
resumed mid-epoch."""

from __future__ import annotations

import pytest
import torch

from samkit.data.loader import InMemoryDataset, make_loader


def dataset(n=40, image_level="basic", batch_level="cutout"):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return InMemoryDataset(
        images,
        labels,
        dataset="cifar10",
        train=True,
        image_level=image_level,
        batch_level=batch_level,
    )


def batches(ds, **kw):
    loader = make_loader(ds, 8, seed=3, epoch=2, **kw)
    return [tuple(t.clone() for t in batch) for batch in loader]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shard", [None, (1, 2)])
def test_the_same_batches_with_each_rows_index(batched, train, shard):
    ds = dataset()
    plain = batches(ds, train=train, batched=batched, shard=shard)
    with_index = batches(ds, train=train, batched=batched, shard=shard, indices=True)
    assert len(plain) == len(with_index) == 5
    seen = []
    for (x, y), (xi, yi, index) in zip(plain, with_index):
        assert torch.equal(x, xi) and torch.equal(y, yi)
        assert index.dtype == torch.int64 and index.shape == y.shape
        assert torch.equal(ds.labels[index], y)
        seen += index.tolist()
    assert len(set(seen)) == len(seen)  # each sample at most once per epoch
    if not train and shard is None:
        assert seen == list(range(40))


@pytest.mark.parametrize("batched", [True, False])
def test_a_resumed_epoch_yields_the_same_indices(batched):
    ds = dataset(image_level="none", batch_level="none")
    full = batches(ds, train=True, batched=batched, indices=True)
    loader = make_loader(ds, 8, train=True, seed=3, batched=batched, indices=True)
    loader.set_epoch(2, start_batch=3)
    resumed = list(loader)
    assert len(resumed) == 2
    for (x, y, i), (xr, yr, ir) in zip(full[3:], resumed):
        assert torch.equal(x, xr) and torch.equal(y, yr) and torch.equal(i, ir)
    # unaugmented training batches are the data set's images at those indices, normalised
    x, _, index = full[0]
    reference = make_loader(ds.subset(index), 8, train=False)
    torch.testing.assert_close(next(iter(reference))[0], x)
