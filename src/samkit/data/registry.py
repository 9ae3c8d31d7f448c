"""The data sets by name, and :func:`build_datasets`, the one entry point the training loop uses.

>>> train_ds, eval_ds, info = build_datasets("cifar10", data_dir="~/data", image_level="basic")
>>> loader = make_loader(train_ds, 128, train=True, seed=0, epoch=0)

``use_test_set=False`` holds out ``holdout_fraction`` of the training set for evaluation (the
seed system's 45,000 / 5,000 for CIFAR; for ``svhn`` the holdout comes from the core training
file only, as in the seed, so that it is not dominated by the easier ``extra`` digits).
``train_subset`` keeps the first examples of the (remaining) training set; ``label_noise`` then
flips that fraction of its labels (see :mod:`samkit.data.noise`; the record is
``train_ds.label_noise``, to be saved in the run directory). The evaluation set is never noised.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from samkit.data.cifar import cifar_class_names, load_cifar
from samkit.data.common import split_holdout
from samkit.data.datasets import DATASET_SPECS
from samkit.data.fashion_mnist import CLASSES, load_fashion_mnist
from samkit.data.image_folder import load_folders
from samkit.data.loader import InMemoryDataset
from samkit.data.noise import LabelNoiseRecord, apply_label_noise
from samkit.data.svhn import SVHN_FILES, find_svhn_dir, load_svhn, num_images
from samkit.data.transforms import train_transform

__all__ = ["DATASETS", "DatasetInfo", "build_datasets"]

PathLike = str | os.PathLike[str]


class Splits(NamedTuple):
    train: Any
    test: Any
    #: How many leading training examples the validation holdout is drawn from (None: all).
    holdout_pool: int | None = None


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A data set's facts (from :data:`samkit.data.datasets.DATASET_SPECS`) and its loader;
    :func:`build_datasets` returns a copy with ``num_classes`` and ``classes`` filled in from the
    data (image folders) and the split sizes."""

    name: str
    num_classes: int | None  # None: from the folder
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    loader: Callable[..., Splits] = dataclasses.field(repr=False, compare=False)
    in_memory: bool = True
    description: str = ""
    classes: tuple[str, ...] | None = None
    train_size: int | None = None
    eval_size: int | None = None


# --------------------------------------------------------------------------------------------
# Loaders: (data_dir, augmentation keywords) -> Splits
# --------------------------------------------------------------------------------------------


def _in_memory(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    classes: list[str] | None,
    aug: dict[str, Any],
    holdout_pool: int | None = None,
) -> Splits:
    aug = {k: v for k, v in aug.items() if k != "image_size"}
    return Splits(
        InMemoryDataset(*train, dataset=name, train=True, classes=classes, **aug),
        InMemoryDataset(*test, dataset=name, train=False, classes=classes, **aug),
        holdout_pool,
    )


def _cifar(name: str) -> Callable[..., Splits]:
    def load(data_dir: PathLike | None, **aug: Any) -> Splits:
        train = load_cifar(name, "train", data_dir)
        test = load_cifar(name, "test", data_dir)
        return _in_memory(name, train, test, cifar_class_names(name, data_dir), aug)

    return load


def _svhn(name: str) -> Callable[..., Splits]:
    def load(data_dir: PathLike | None, **aug: Any) -> Splits:
        train = load_svhn(name, "train", data_dir)
        test = load_svhn(name, "test", data_dir)
        pool = None
        if name == "svhn":  # train_32x32.mat comes first; hold out from it only
            pool = num_images(find_svhn_dir(name, data_dir) / SVHN_FILES["train"])
        return _in_memory(name, train, test, [str(i) for i in range(10)], aug, pool)

    return load


def _fashion_mnist(data_dir: PathLike | None, **aug: Any) -> Splits:
    def split(s: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = load_fashion_mnist(s, data_dir)
        return images.unsqueeze(1).contiguous(), labels.to(torch.int64)

    return _in_memory("fashion_mnist", split("train"), split("test"), list(CLASSES), aug)


def _folders(name: str) -> Callable[..., Splits]:
    def load(data_dir: PathLike | None, **aug: Any) -> Splits:
        train, test = load_folders(name, data_dir, **aug)
        return Splits(train, test)

    return load


#: The loader of each data set: ``(data_dir, **augmentation keywords) -> Splits``.
_LOADERS: dict[str, Callable[..., Splits]] = {
    "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"),
    "svhn": _svhn("svhn"),
    "svhn_core": _svhn("svhn_core"),
    "fashion_mnist": _fashion_mnist,
    "imagenet": _folders("imagenet"),
    "image_folder": _folders("image_folder"),
}

#: name -> :class:`DatasetInfo`, in the order of :data:`~samkit.data.datasets.DATASET_SPECS`.
DATASETS: dict[str, DatasetInfo] = {
    name: DatasetInfo(
        name,
        spec.num_classes,
        spec.in_channels,
        spec.image_size,
        spec.mean,
        spec.std,
        _LOADERS[name],
        in_memory=spec.in_memory,
        description=spec.description,
    )
    for name, spec in DATASET_SPECS.items()
}


def build_datasets(
    name: str,
    *,
    data_dir: PathLike | None = None,
    use_test_set: bool = True,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    label_noise: float = 0.0,
    train_subset: int | None = None,
    image_level: str = "basic",
    batch_level: str = "none",
    cutout_length: int = 16,
    image_size: int | None = None,
    holdout_seed: int | None = None,
) -> tuple[Any, Any, DatasetInfo]:
    """``(train_ds, eval_ds, info)`` for data set ``name``.

    ``train_ds`` applies the training augmentation (``image_level`` in none / basic /
    autoaugment / aa-only (SVHN) / randaugment (folders); ``batch_level`` none / cutout), and
    ``eval_ds`` the eval transform; use :func:`samkit.data.loader.make_loader` to batch them.
    Both are :class:`InMemoryDataset` (CIFAR, SVHN, Fashion-MNIST) or ``ImageFolderDataset``.
    ``eval_ds`` is the test set, or with ``use_test_set=False`` a holdout of
    ``holdout_fraction`` of the training set drawn with ``seed``. ``seed`` also draws the
    label noise. ``holdout_seed`` (default: ``seed``) draws the holdout instead, so that runs
    with different seeds can share one validation set. ``image_size`` is the crop size of image
    folders (default 224).

    Raises ``ValueError`` for an unknown ``name`` (listing the known ones),
    :class:`~samkit.data.DataNotFoundError` when the files are not found (naming every path
    searched) and :class:`~samkit.data.common.DataFormatError` (or the Fashion-MNIST loader's
    ``IDXFormatError``) for truncated or corrupt files.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    if train_subset is not None and train_subset < 1:
        raise ValueError(f"train_subset must be >= 1, not {train_subset}")
    info = DATASETS[name]
    aug = {
        "image_level": image_level,
        "batch_level": batch_level,
        "cutout_length": cutout_length,
        "image_size": image_size,
    }
    if info.in_memory and image_size is not None and image_size != info.image_size:
        raise ValueError(f"{name} images are {info.image_size} px; image_size cannot change it")
    # Validate the augmentation names before reading any data.
    train_transform(name, image_level, batch_level, cutout_length, image_size=image_size)

    splits = info.loader(data_dir, **aug)
    train_ds, eval_ds = splits.train, splits.test
    if not use_test_set:
        pool = len(train_ds) if splits.holdout_pool is None else splits.holdout_pool
        _, val_idx = split_holdout(
            pool, holdout_fraction, seed if holdout_seed is None else holdout_seed
        )
        keep = torch.ones(len(train_ds), dtype=torch.bool)
        keep[val_idx] = False
        eval_ds = train_ds.subset(val_idx)
        eval_ds.train = False
        train_ds = train_ds.subset(keep.nonzero().flatten())
    if train_subset is not None:
        if train_subset > len(train_ds):
            raise ValueError(
                f"train_subset={train_subset} but {name} has {len(train_ds)} training examples"
            )
        train_ds = train_ds.subset(torch.arange(train_subset))

    classes = getattr(train_ds, "classes", None)
    num_classes = info.num_classes
    if not info.in_memory:
        # From the class folders (a partial ImageNet, e.g. 100 classes, is fine).
        num_classes = len(classes)
    record: LabelNoiseRecord | None = None
    if label_noise > 0:
        labels = train_ds.labels
        noisy, flipped = apply_label_noise(labels, label_noise, num_classes, seed)
        record = LabelNoiseRecord.from_noise(
            labels,
            noisy,
            flipped,
            fraction=label_noise,
            num_classes=num_classes,
            seed=seed,
            source_indices=train_ds.source_indices,
        )
        train_ds = train_ds.with_labels(noisy)
    train_ds.label_noise = record
    resolved = dataclasses.replace(
        info,
        num_classes=num_classes,
        classes=tuple(classes) if classes is not None else None,
        train_size=len(train_ds),
        eval_size=len(eval_ds),
    )
    return train_ds, eval_ds, resolved
