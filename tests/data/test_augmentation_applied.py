"""The training augmentations are actually applied, and the evaluation data never augmented.

A loader that never augmented would pass a test that only asks "is each output one of the
possible crops?" (the centre crop without a flip is one of them). Here the flip and crop offset
of every output image are recovered (by comparison with every flip x offset of its source image,
built with F.pad, independently of samkit's gather), and over a fixed seed and a few hundred
images the outcomes must look like the draws they should be: every offset (dy, dx) in 0..8
appears, the identity is rare, the flips are Binomial(n, 1/2) (5 standard deviations) where the
data-set table says to flip and absent where it says not to, cutout zeroes a square in every
image, two batches or two epochs do not repeat their draws, AutoAugment changes images beyond a
crop and flip, and image folders crop at random. The labels of the data sets built here are the
image indices, so every output is matched to its source image.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data_formats import write_image_folder
from samkit.data import build_datasets
from samkit.data.datasets import DATASET_SPECS
from samkit.data.loader import InMemoryDataset, make_loader
from samkit.data.transforms import eval_transform

IN_MEMORY = [name for name, spec in DATASET_SPECS.items() if spec.in_memory]
FOLDERS = [name for name, spec in DATASET_SPECS.items() if not spec.in_memory]
N, BATCH, PAD = 320, 40, 4
OFFSETS = 2 * PAD + 1  # 9 crop offsets per axis


def images(name: str, n: int = N, seed: int = 0) -> torch.Tensor:
    spec = DATASET_SPECS[name]
    g = torch.Generator().manual_seed(seed)
    shape = (n, spec.in_channels, spec.image_size, spec.image_size)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def dataset(name: str, image_level="basic", batch_level="none", n: int = N) -> InMemoryDataset:
    return InMemoryDataset(
        images(name, n),
        torch.arange(n),  # label = index of the source image
        dataset=name,
        train=True,
        image_level=image_level,
        batch_level=batch_level,
    )


def normalise(x: torch.Tensor, name: str) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, from the data-set table."""
    spec = DATASET_SPECS[name]
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    return (x.float() / 255 - mean) / std


def pixels(out: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``uint8`` pixels a normalised output was made of (checked to be whole numbers), and
    the mask of the pixels cutout did not zero."""
    spec = DATASET_SPECS[name]
    mean = torch.tensor(spec.mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float64).view(-1, 1, 1)
    raw = (out.double() * std + mean) * 255
    keep = out != 0
    assert ((raw - raw.round()).abs() * keep).amax() < 1e-3, "not a normalised uint8 image"
    return raw.round().clamp(0, 255).to(torch.uint8), keep


def recover(out: torch.Tensor, source: torch.Tensor, name: str) -> tuple[bool, int, int] | None:
    """``(flipped, dy, dx)`` of the one crop of ``source`` (flipped or not, reflect-padded by 4,
    cropped at offset (dy, dx)) that ``out`` is (pixels zeroed by cutout ignored), or None if it
    is none of them."""
    _, h, w = source.shape
    both = torch.stack([source, source.flip(-1)]).float()
    padded = F.pad(both, (PAD, PAD, PAD, PAD), mode="reflect").to(torch.uint8)  # [2, C, H+8, W+8]
    windows = padded.unfold(2, h, 1).unfold(3, w, 1).permute(0, 2, 3, 1, 4, 5)  # [2, 9, 9, C, H, W]
    target, keep = pixels(out, name)
    # a 4 x 4 patch first (cheap), then the whole image for the candidates that pass it
    patch = (slice(None),) * 4 + (slice(8, 12), slice(8, 12))
    near = ((windows[patch] == target[..., 8:12, 8:12]) | ~keep[..., 8:12, 8:12]).flatten(3)
    matches = [
        [f, dy, dx]
        for f, dy, dx in near.all(3).nonzero().tolist()
        if ((windows[f, dy, dx] == target) | ~keep).all()
    ]
    if not matches:
        return None
    assert len(matches) == 1, f"ambiguous crop: {matches}"  # random images: never
    flipped, dy, dx = matches[0]
    return bool(flipped), dy, dx


def collect(loader) -> tuple[torch.Tensor, list[int], list[int]]:
    """All outputs of one pass, their source indices and the batch each came in."""
    xs, ys, batch_of = [], [], []
    for k, (x, y) in enumerate(loader):
        xs.append(x.clone())
        ys += y.tolist()
        batch_of += [k] * len(y)
    return torch.cat(xs), ys, batch_of


def draws(name: str, loader, ds) -> tuple[list, list[int]]:
    out, ys, batch_of = collect(loader)
    found = [recover(o, ds.images[i], name) for o, i in zip(out, ys)]
    assert all(f is not None for f in found), "an output that is no flip / crop of its image"
    return found, batch_of


def binomial_ok(count: int, n: int, p: float = 0.5, sds: float = 5.0) -> bool:
    mean, sd = n * p, (n * p * (1 - p)) ** 0.5
    return abs(count - mean) <= sds * sd


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("name", IN_MEMORY)
def test_basic_draws_every_offset_and_flips_as_the_table_says(name, batched):
    ds = dataset(name)
    loader = make_loader(ds, BATCH, train=True, seed=0, batched=batched)
    found, batch_of = draws(name, loader, ds)
    assert len(found) == N
    offsets = {(dy, dx) for _, dy, dx in found}
    # 320 uniform draws of 81 offsets miss about 1.5 of them on average
    assert len(offsets) >= 70, sorted(offsets)
    assert {dy for _, dy, _ in found} == set(range(OFFSETS)) == {dx for _, _, dx in found}
    identity = sum(f == (False, PAD, PAD) for f in found)  # 320 / 162 expected
    assert identity <= 20
    flips = sum(flipped for flipped, _, _ in found)
    if DATASET_SPECS[name].flip:
        assert binomial_ok(flips, N), flips
    else:  # SVHN: a mirrored digit is another digit or none
        assert flips == 0
    # the batches do not repeat each other's draws
    per_batch = [tuple(f for f, b in zip(found, batch_of) if b == k) for k in range(N // BATCH)]
    assert len(set(per_batch)) == N // BATCH


@pytest.mark.parametrize("batched", [True, False])
def test_each_epoch_draws_anew(batched):
    name = "cifar10"
    ds = dataset(name, n=200)
    loader = make_loader(ds, BATCH, train=True, seed=0, batched=batched)
    by_epoch = []
    for _ in range(2):  # each pass is the next epoch
        out, ys, _ = collect(loader)
        by_epoch.append({i: recover(o, ds.images[i], name) for o, i in zip(out, ys)})
    same = sum(by_epoch[0][i] == by_epoch[1][i] for i in range(200))  # 200 / 162 expected
    assert same <= 15
    # and another seed draws otherwise
    other = make_loader(ds, BATCH, train=True, seed=1, batched=batched)
    out, ys, _ = collect(other)
    differ = sum(recover(o, ds.images[i], name) != by_epoch[0][i] for o, i in zip(out, ys))
    assert differ >= 185


def cutout_box(image: torch.Tensor) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the zeroed pixels, checked to be one filled rectangle
    across every channel."""
    zero = image == 0
    assert torch.equal(zero, zero[:1].expand_as(zero)), "cutout differs between channels"
    rows = zero[0].any(1).nonzero().flatten()
    cols = zero[0].any(0).nonzero().flatten()
    assert len(rows) and len(cols), "no cutout"
    box = (rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1)
    assert int(zero[0].sum()) == (box[1] - box[0]) * (box[3] - box[2]), "not a rectangle"
    return box


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("name", ["cifar100", "fashion_mnist"])
def test_cutout_zeroes_a_random_square_in_every_image(name, batched):
    ds = dataset(name, batch_level="cutout", n=200)
    out, ys, _ = collect(make_loader(ds, BATCH, train=True, seed=0, batched=batched))
    size = DATASET_SPECS[name].image_size
    boxes = [cutout_box(o) for o in out]
    for top, bottom, left, right in boxes:
        # a 16 x 16 square centred uniformly over the image, clipped at the borders
        assert 8 <= bottom - top <= 16 and 8 <= right - left <= 16
        assert top >= 0 and left >= 0 and bottom <= size and right <= size
    assert sum(b[1] - b[0] == 16 and b[3] - b[2] == 16 for b in boxes) >= 20  # ~0.25 expected
    assert len({(b[0], b[2]) for b in boxes}) >= 60  # the positions vary
    # outside the square, the image is a flip / crop of its source
    assert all(recover(o, ds.images[i], name) is not None for o, i in zip(out, ys))


@pytest.mark.parametrize(
    "name,image_level,crops,least",
    [("cifar10", "autoaugment", True, 40), ("fashion_mnist", "autoaugment", True, 40),
     ("svhn", "aa-only", False, 60)],
)  # fmt: skip
def test_autoaugment_changes_images_beyond_crop_and_flip(name, image_level, crops, least):
    ds = dataset(name, image_level=image_level, n=120)
    out, ys, _ = collect(make_loader(ds, 40, train=True, seed=0))
    if crops:  # not a flip / crop of the source
        changed = sum(recover(o, ds.images[i], name) is None for o, i in zip(out, ys))
    else:  # aa-only: no crop, no flip; unchanged means the source's pixels
        changed = sum(not torch.equal(pixels(o, name)[0], ds.images[i]) for o, i in zip(out, ys))
    # Each sub-policy applies each of its two operations with some probability, and some leave a
    # random image as it is: about 75 of 120 change with basic after it, 110 with aa-only (seeds
    # 0-3); a loader that did not apply AutoAugment would change none.
    assert changed >= least, changed


@pytest.mark.parametrize("name", FOLDERS)
def test_image_folders_crop_at_random_and_evaluate_the_centre(name, tmp_path):
    layout = {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}}
    write_image_folder(tmp_path / name, layout, seed=0, size=(40, 48))
    train_ds, eval_ds, _ = build_datasets(
        name, data_dir=tmp_path / name, image_level="basic", image_size=16
    )
    train_ds = train_ds.with_labels(torch.arange(len(train_ds)))  # label = index
    loader = make_loader(train_ds, 4, train=True, seed=0)
    epochs = []
    for _ in range(3):
        out, ys, _ = collect(loader)
        epochs.append({i: o for o, i in zip(out, ys)})
    for i in range(len(train_ds)):  # a random resized crop (and flip) each time
        a, b, c = (e[i] for e in epochs)
        assert not torch.equal(a, b) and not torch.equal(b, c) and not torch.equal(a, c), i
    # evaluation: the same centre crop every time, for training and evaluation splits
    for ds in (train_ds, eval_ds):
        first, _, _ = collect(make_loader(ds, 3, train=False))
        again, _, _ = collect(make_loader(ds, 3, train=False))
        assert torch.equal(first, again)
        image0 = ds.loader(ds.samples[0][0])
        assert torch.equal(first[0], eval_transform(name, image_size=16)(image0))


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("image_level", ["basic", "autoaugment"])
@pytest.mark.parametrize("name", IN_MEMORY)
def test_evaluation_data_are_never_augmented(name, image_level, batched):
    if image_level == "autoaugment" and batched:
        batched = None  # no batched form of AutoAugment; evaluation still has one
    ds = dataset(name, image_level=image_level, batch_level="cutout", n=60)
    for epoch in range(2):
        out, ys, _ = collect(make_loader(ds, 16, train=False, seed=epoch, batched=batched))
        assert ys == list(range(60))  # in order
        # (per sample, torchvision normalises with other float32 rounding: 1e-6 apart)
        torch.testing.assert_close(out, normalise(ds.images, name), rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_test_set", [True, False])
def test_the_evaluation_split_of_build_datasets_is_not_augmented(tmp_path, use_test_set):
    from data_formats import write_fashion_mnist

    arrays = write_fashion_mnist(tmp_path / "fm", n_train=40, n_test=12, seed=3)
    train_ds, eval_ds, _ = build_datasets(
        "fashion_mnist",
        data_dir=tmp_path / "fm",
        image_level="basic",
        batch_level="cutout",
        use_test_set=use_test_set,
        holdout_fraction=0.25,
    )
    out, _, _ = collect(make_loader(eval_ds, 5, train=False))
    if use_test_set:
        source = torch.as_tensor(arrays["test_images"])[:, None]
    else:  # a holdout of the training images, in the holdout's order
        source = eval_ds.images
        all_train = torch.as_tensor(arrays["train_images"])[:, None]
        assert all(any(torch.equal(s, t) for t in all_train) for s in source)
    torch.testing.assert_close(out, normalise(source, "fashion_mnist"), rtol=0, atol=1e-5)
    # while the training split is augmented
    x, y = next(iter(make_loader(train_ds, len(train_ds), train=True, seed=0)))
    assert not torch.equal(x, normalise(train_ds.images[y], "fashion_mnist"))
