"""Image folders (ImageNet layout) with PNGs written by PIL, and the ImageNet transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samkit.data.common import DataFormatError, DataNotFoundError
from samkit.data.image_folder import ImageFolderDataset, find_image_folder, load_folders, load_image
from samkit.data.loader import SampleLoader, make_loader
from samkit.data.transforms import eval_transform, train_transform

LAYOUT = {
    "train": {"cat": 3, "dog": 2, "emu": 2},
    "val": {"dog": 2, "emu": 1},  # no "cat": indices must still follow train/
}


def test_classes_labels_and_pixels(tmp_path, writers):
    written = writers.image_folder(tmp_path, LAYOUT)
    train, val = load_folders("image_folder", tmp_path)
    assert train.classes == ["cat", "dog", "emu"] and val.classes == ["cat", "dog", "emu"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert val.labels.tolist() == [1, 1, 2]
    assert val.class_to_idx == train.class_to_idx
    for path, _ in train.samples + val.samples:
        rel = "/".join(path.split("/")[-3:])
        img = load_image(path)
        assert img.dtype == torch.uint8 and img.shape == (3, 20, 24)
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), written[rel])


def test_grayscale_and_test_split(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(np.full((8, 9), 77, np.uint8), mode="L").save(tmp_path / split / "a/x.png")
    train, test = load_folders("image_folder", tmp_path)
    img = train.loader(train.samples[0][0])
    assert img.shape == (3, 8, 9) and bool((img == 77).all())
    assert len(test) == 1


def test_transformed_samples_are_224(tmp_path, writers):
    writers.image_folder(tmp_path, LAYOUT)
    train, val = load_folders("imagenet", tmp_path, image_level="autoaugment")
    torch.manual_seed(0)
    x, y = train[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 0
    x, y = val[0]
    assert x.shape == (3, 224, 224) and y == 1
    small, _ = load_folders("image_folder", tmp_path, image_size=64)
    assert small.get(0, train=True)[0].shape == (3, 64, 64)
    assert small.get(0, train=False)[0].shape == (3, 64, 64)


def test_imagenet_transforms_shapes():
    img = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    torch.manual_seed(0)
    for level in ("none", "basic", "autoaugment", "randaugment"):
        out = train_transform("imagenet", level)(img)
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    names = [type(t).__name__ for t in train_transform("imagenet", "autoaugment").transforms]
    assert names[:3] == ["RandomResizedCrop", "RandAugment", "RandomHorizontalFlip"]
    ra = train_transform("imagenet", "autoaugment").transforms[1]
    assert (ra.num_ops, ra.magnitude) == (2, 9)
    ev = eval_transform("imagenet")
    assert [type(t).__name__ for t in ev.transforms][:2] == ["Resize", "CenterCrop"]
    assert ev.transforms[0].size == [256]
    assert ev(img).shape == (3, 224, 224)
    # Eval of a 256 x 256 image is its centre 224 crop, normalised.
    sq = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    expected = (sq[:, 16:240, 16:240].float() / 255 - mean) / std
    torch.testing.assert_close(ev(sq), expected)


def test_loader_batches_and_is_deterministic(tmp_path, writers):
    writers.image_folder(tmp_path, LAYOUT)
    train, val = load_folders("image_folder", tmp_path, image_size=32)

    def run(loader):
        return [(x.clone(), y.clone()) for x, y in loader]

    a = make_loader(train, 4, train=True, seed=3, epoch=1)
    assert isinstance(a, SampleLoader) and len(a) == 1  # 7 images, ragged batch dropped
    b1, b2 = run(a), run(make_loader(train, 4, train=True, seed=3, epoch=1))
    assert b1[0][0].shape == (4, 3, 32, 32)
    assert torch.equal(b1[0][0], b2[0][0]) and torch.equal(b1[0][1], b2[0][1])
    ev = run(make_loader(val, 2, train=False))
    assert [y.tolist() for _, y in ev] == [[1, 1], [2]]


def test_truncated_image_names_file(tmp_path, writers):
    writers.image_folder(tmp_path, LAYOUT)
    bad = tmp_path / "train/dog/1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    train, _ = load_folders("image_folder", tmp_path)
    index = [p for p, _ in train.samples].index(str(bad))
    with pytest.raises(DataFormatError, match=r"dog/1\.png: cannot decode image"):
        train.get(index, train=False)


def test_eval_class_not_in_train(tmp_path, writers):
    writers.image_folder(tmp_path, {"train": {"a": 1}, "val": {"a": 1, "zebra": 1}})
    with pytest.raises(DataFormatError, match="zebra"):
        load_folders("image_folder", tmp_path)


def test_empty_class_folder(tmp_path, writers):
    writers.image_folder(tmp_path, {"train": {"a": 1}, "val": {"a": 1}})
    (tmp_path / "train/b").mkdir()
    with pytest.raises(DataFormatError, match="train"):
        ImageFolderDataset(tmp_path / "train")


def test_missing_folder_names_paths(tmp_path, empty_search):
    (tmp_path / "only_train" / "train").mkdir(parents=True)
    with pytest.raises(DataNotFoundError) as err:
        find_image_folder("imagenet", tmp_path / "only_train")
    assert str(tmp_path / "only_train") in str(err.value) and "val/" in str(err.value)
    with pytest.raises(DataNotFoundError) as err:
        find_image_folder("imagenet")
    assert str(empty_search / ".cache/samkit/imagenet") in str(err.value)
