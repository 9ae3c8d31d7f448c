"""Per-sample (torchvision v2) and batched augmentations, cutout and normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samkit.data.transforms import (
    NORMALIZATION,
    BatchAugment,
    Cutout,
    apply_crop_flip,
    batch_augment,
    channel_stats,
    crop_flip_params,
    cutout_batch,
    cutout_params,
    eval_transform,
    normalize_batch,
    random_crop_flip_batch,
    train_transform,
)


def _images(b=16, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=g)


def _direct_crop(img: torch.Tensor, flip: bool, dy: int, dx: int, pad: int) -> torch.Tensor:
    """Flip, reflect-pad with F.pad and slice: the definition of the batched op."""
    _, h, w = img.shape
    x = img.flip(-1) if flip else img
    padded = F.pad(x[None].float(), (pad, pad, pad, pad), mode="reflect")[0]
    return padded[:, dy : dy + h, dx : dx + w].to(img.dtype)


@pytest.mark.parametrize(
    "shape,pad", [((16, 3, 32, 32), 4), ((9, 1, 28, 28), 4), ((5, 3, 7, 9), 3)]
)
def test_batched_crops_are_crops_of_reflect_padded_image(shape, pad):
    x = _images(*shape)
    flips, dy, dx = crop_flip_params(shape[0], torch.Generator().manual_seed(5), pad, flip=True)
    out = apply_crop_flip(x, flips, dy, dx, pad)
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.is_contiguous()
    for i in range(shape[0]):
        expected = _direct_crop(x[i], bool(flips[i]), int(dy[i]), int(dx[i]), pad)
        assert torch.equal(out[i], expected), i
    # The one-call version makes the same draws in the same order.
    again = random_crop_flip_batch(x, torch.Generator().manual_seed(5), pad, flip=True)
    assert torch.equal(again, out)


def test_flips_and_offsets_exact():
    x = _images(4)
    ones, zeros = torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    centre = torch.full((4,), 4)
    assert torch.equal(apply_crop_flip(x, zeros, centre, centre, 4), x)  # centre crop = identity
    assert torch.equal(apply_crop_flip(x, ones, centre, centre, 4), x.flip(-1))
    # Offset (0, 8): rows shifted down by 4 with reflection at the top; columns left by 4.
    out = apply_crop_flip(x, zeros, torch.zeros(4, dtype=torch.long), torch.full((4,), 8), 4)
    assert torch.equal(out[:, :, 4:, :28], x[:, :, :28, 4:])
    assert torch.equal(out[:, :, 3, :28], x[:, :, 1, 4:])  # reflect: row -1 is row 1
    assert torch.equal(out[:, :, 4:, 28], x[:, :, :28, 30])  # column 32 is column 30


def test_draws_cover_all_offsets_and_both_flips():
    flips, dy, dx = crop_flip_params(4000, torch.Generator().manual_seed(0), 4, True)
    assert set(dy.tolist()) == set(range(9)) == set(dx.tolist())
    assert 0.45 < flips.float().mean() < 0.55
    flips, _, _ = crop_flip_params(100, torch.Generator().manual_seed(0), 4, flip=False)
    assert not flips.any()


def test_batched_basic_deterministic_per_generator():
    x = _images(8)
    aug = batch_augment("cifar10", "basic", "cutout")
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_sample_basic_is_a_flip_crop_of_the_padded_image():
    img = _images(1)[0]
    t = train_transform("cifar10", "basic")
    mean, std = NORMALIZATION["cifar10"]
    flips = torch.tensor([f for f in (False, True) for _ in range(81)])
    offsets = torch.arange(81).repeat(2)
    crops = apply_crop_flip(img.expand(162, -1, -1, -1), flips, offsets // 9, offsets % 9, 4)
    # Every flip / offset, normalised (apply_crop_flip is checked against F.pad above).
    candidates = normalize_batch(crops, mean, std)
    torch.manual_seed(0)
    for _ in range(10):
        out = t(img)
        assert (candidates - out).abs().amax(dim=(1, 2, 3)).min() < 1e-6
    torch.manual_seed(7)
    first = t(img)
    torch.manual_seed(7)
    assert torch.equal(first, t(img))


def test_svhn_is_not_flipped():
    assert batch_augment("svhn", "basic") == BatchAugment(
        NORMALIZATION["svhn"][0], NORMALIZATION["svhn"][1], crop=True, flip=False
    )
    names = [type(t).__name__ for t in train_transform("svhn", "autoaugment").transforms]
    assert "RandomHorizontalFlip" not in names and names[0] == "AutoAugment"
    assert train_transform("svhn", "autoaugment").transforms[0].policy.value == "svhn"
    names = [type(t).__name__ for t in train_transform("svhn", "aa-only").transforms]
    assert names == ["AutoAugment", "ToDtype", "Normalize"]
    assert batch_augment("fashion_mnist", "basic").flip
    assert batch_augment("cifar10", "autoaugment") is None
    assert batch_augment("imagenet", "basic") is None


def _zero_box(mask2d: torch.Tensor):
    rows = mask2d.any(1).nonzero().flatten()
    cols = mask2d.any(0).nonzero().flatten()
    return rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1


@pytest.mark.parametrize(
    "cy,cx,box",
    [
        (16, 16, (8, 24, 8, 24)),
        (0, 0, (0, 8, 0, 8)),
        (31, 5, (23, 32, 0, 13)),
        (9, 30, (1, 17, 22, 32)),
    ],
)
def test_cutout_zeroes_exactly_the_clipped_square(cy, cx, box):
    x = torch.randn(2, 3, 32, 32).abs() + 0.1  # no zeros before
    out = cutout_batch(x, 16, centres=(torch.tensor([cy, 16]), torch.tensor([cx, 16])))
    zero = out[0] == 0
    assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])  # all channels
    y0, y1, x0, x1 = box
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[y0:y1, x0:x1] = True
    assert torch.equal(zero[0], expected)
    assert torch.equal(out[0][~zero], x[0][~zero])
    assert int((out[1] == 0).sum()) == 3 * 256


def test_cutout_random_centres_match_replayed_draws():
    x = torch.ones(64, 1, 28, 28)
    out = cutout_batch(x, 16, torch.Generator().manual_seed(3))
    cy, cx = cutout_params(64, 28, 28, torch.Generator().manual_seed(3))
    for i in range(64):
        y0, y1 = max(0, int(cy[i]) - 8), min(28, int(cy[i]) + 8)
        x0, x1 = max(0, int(cx[i]) - 8), min(28, int(cx[i]) + 8)
        assert _zero_box(out[i, 0] == 0) == (y0, y1, x0, x1)
        assert int((out[i, 0] == 0).sum()) == (y1 - y0) * (x1 - x0)
    assert x.eq(1).all()  # the input is not modified


def test_cutout_module_per_sample():
    torch.manual_seed(0)
    m = Cutout(16)
    sizes = set()
    for _ in range(30):
        out = m(torch.ones(3, 32, 32))
        y0, y1, x0, x1 = _zero_box(out[0] == 0)
        assert y1 - y0 <= 16 and x1 - x0 <= 16
        assert int((out == 0).sum()) == 3 * (y1 - y0) * (x1 - x0)
        sizes.add((y1 - y0, x1 - x0))
    assert (16, 16) in sizes
    # Applied after normalisation in the per-sample pipeline.
    names = [type(t).__name__ for t in train_transform("cifar10", "basic", "cutout").transforms]
    assert names[-2:] == ["Normalize", "Cutout"]


@pytest.mark.parametrize(
    "dataset,shape",
    [("cifar10", (3, 32, 32)), ("svhn", (3, 32, 32)), ("fashion_mnist", (1, 28, 28))],
)
def test_autoaugment_on_uint8(dataset, shape):
    t = train_transform(dataset, "autoaugment", "cutout")
    img = torch.randint(
        0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    torch.manual_seed(0)
    outs = [t(img) for _ in range(12)]
    assert all(o.shape == shape and o.dtype == torch.float32 for o in outs)
    assert all(torch.isfinite(o).all() for o in outs)
    assert len({o.sum().item() for o in outs}) > 1
    aa = train_transform(dataset, "aa-only" if dataset == "svhn" else "autoaugment").transforms[0]
    for _ in range(12):
        y = aa(img)
        assert y.shape == shape and y.dtype == torch.uint8


def test_eval_normalisation_matches_batched():
    x = _images(4)
    mean, std = NORMALIZATION["cifar100"]
    per_sample = torch.stack([eval_transform("cifar100")(im) for im in x])
    batched = normalize_batch(x, mean, std)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(per_sample, expected)
    torch.testing.assert_close(batched, expected)
    assert batch_augment("cifar100")(x, None).equal(batched)


def test_channel_stats():
    x = _images(50, 3, 8, 8)
    mean, std = channel_stats(x, chunk=7)
    f = x.double() / 255
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), f.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(
        torch.tensor(std, dtype=torch.float64), f.permute(1, 0, 2, 3).reshape(3, -1).std(1, False)
    )


def test_bad_levels():
    with pytest.raises(ValueError, match="image_level"):
        train_transform("cifar10", "strong")
    with pytest.raises(ValueError, match="batch_level"):
        train_transform("cifar10", "basic", "mixup")
    with pytest.raises(ValueError, match="randaugment"):
        train_transform("cifar10", "randaugment")
    with pytest.raises(ValueError, match="known"):
        eval_transform("mnist")
